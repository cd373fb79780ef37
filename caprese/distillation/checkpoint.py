"""Checkpoints that are never half-read: tensors in safetensors, the rest in JSON.

A checkpoint is a tensors file with a unique name plus a small JSON "pointer" that names it
and records its sha256. The pointer is renamed into place last, so a reader sees the previous
complete checkpoint or the new complete one; stale tensor files are deleted afterwards.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from caprese import distributed
from caprese.distillation import cost
from caprese.io import atomic_write, atomic_write_text, sha256_file


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be trusted."""


class CheckpointClock:
    """When a loop saves: every `every` units of work, at the end, and whenever `minutes`
    have passed since the last save, so a kill never loses more than that much work however
    slow a unit is (a 1.5B teacher pass of 8 sequences takes 1.5 minutes on a 2-core CPU;
    50 of them would be 80 minutes). Under torchrun rank 0's clock decides for every rank."""

    def __init__(self, every: int, minutes: float) -> None:
        self.every, self.seconds = every, minutes * 60
        self.last = time.monotonic()

    def due(self, done: int, total: int) -> bool:
        late = time.monotonic() - self.last >= self.seconds
        if distributed.world_size() > 1:
            late = bool(distributed.broadcast(late))
        if done % self.every == 0 or done == total or late:
            self.last = time.monotonic()
            return True
        return False


def save_checkpoint(
    directory: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.time_ns()}"
    tensor_file = directory / f"{name}.{stamp}.safetensors"
    cpu = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    atomic_write(tensor_file, lambda tmp: save_file(cpu, tmp))
    pointer = {**meta, "tensors": tensor_file.name, "sha256": sha256_file(tensor_file)}
    atomic_write_text(directory / f"{name}.json", json.dumps(pointer, indent=2))
    cost.note_checkpoint(directory)
    for stale in directory.glob(f"{name}.*.safetensors"):
        if stale != tensor_file:
            stale.unlink(missing_ok=True)


def load_checkpoint(directory: Path, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of the last complete checkpoint, or None when there is none."""
    pointer_file = directory / f"{name}.json"
    if not pointer_file.is_file():
        return None
    try:
        meta = json.loads(pointer_file.read_text())
        tensor_file = directory / meta.pop("tensors")
        checksum = meta.pop("sha256")
    except (json.JSONDecodeError, KeyError) as error:
        raise CheckpointError(
            f"{pointer_file} is damaged ({error}); delete it to restart"
        ) from error
    if not tensor_file.is_file() or sha256_file(tensor_file) != checksum:
        raise CheckpointError(
            f"{tensor_file} is missing or does not match {pointer_file}; delete both to restart "
            "this stage"
        )
    return load_file(tensor_file), meta


def remove_checkpoint(directory: Path, name: str) -> None:
    for path in [directory / f"{name}.json", *directory.glob(f"{name}.*.safetensors")]:
        path.unlink(missing_ok=True)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat tensors (its hyper-parameters live in the config)."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            flat[f"optim.{index}.{key}"] = torch.as_tensor(value)
    return flat


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    saved = optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    saved["state"] = state
    optimizer.load_state_dict(saved)
