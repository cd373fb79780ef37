"""attach / detach / save / load: the Caprese adapter's life cycle on a Hugging Face model.

An adapter directory holds two files:
- caprese_config.json: the CapreseConfig (method, density, rank, layers, ...), the base
  model's fingerprint, the sha256 of the weights file, the adapter format and the caprese
  version that wrote it, and what produced the weights (`trained`, e.g. the stage);
- adapter.safetensors: L and R of every modified layer ("layers.{i}.L", "layers.{i}.R").
Both are written to temporary files and renamed into place; the checksum ties the pair
together, so a half-updated or truncated adapter is refused instead of silently loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from caprese.block import CapreseBlock, PhaseState
from caprese.config import CapreseConfig
from caprese.families import (
    check_family,
    check_gated_mlp,
    decoder,
    decoder_layers,
    mlp_of,
    set_mlp,
    text_config,
)
from caprese.families import fingerprint as config_fingerprint
from caprese.io import atomic_write, atomic_write_text, sha256_file
from caprese.methods import build_method
from caprese.models import ready_adapters
from caprese.phases import PhaseHook, guarded_generate, teacher
from caprese.version import ADAPTER_FORMAT, __version__

CONFIG_FILE = "caprese_config.json"
WEIGHTS_FILE = "adapter.safetensors"
# L of layer i starts from seed * LAYER_SEED_STRIDE + i: a prime above any layer count, so
# no two (seed, layer) pairs share a generator.
LAYER_SEED_STRIDE = 100_003
# Keys of caprese_config.json beside the CapreseConfig fields.
RECORD_KEYS = ("weights_sha256", "format", "caprese_version", "trained")


class AdapterError(ValueError):
    """An adapter that cannot be used: missing, corrupt, or made for another model."""


@dataclass
class Handle:
    """What attach changed on a model, so that detach can undo exactly that."""

    config: CapreseConfig
    state: PhaseState
    blocks: dict[int, CapreseBlock]
    hooks: list[torch.utils.hooks.RemovableHandle]
    requires_grad: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterInfo:
    """What caprese_config.json says besides the config: which format and version wrote it,
    the weights' checksum, and what produced the weights (e.g. {"stage": "e2e"})."""

    config: CapreseConfig
    weights_sha256: str
    format: int
    caprese_version: str | None
    trained: dict


def handle_of(model: nn.Module) -> Handle:
    """What attach recorded on the model."""
    handle = getattr(model, "_caprese", None)
    if handle is None:
        raise ValueError("this model has no caprese blocks: call caprese.attach(model, config)")
    return handle


def fingerprint(model: nn.Module) -> dict:
    return {"architecture": type(model).__name__, **config_fingerprint(model.config)}


def blocks(model: nn.Module) -> dict[int, CapreseBlock]:
    """Layer index -> CapreseBlock of an attached model."""
    return handle_of(model).blocks


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """The LM head gets the last position as a strided slice (logits_to_keep). With frozen
    weights, PyTorch 2.13 multiplies such a slice by copying the whole head matrix (2.9 s per
    prompt for a 150K vocabulary); an input with standard strides takes the normal path, the
    one (and the bits) an unfrozen model gets. `.contiguous()` is not enough: a (1, 1, D)
    slice counts as contiguous (size-1 dims) but keeps its strides."""
    x = args[0]
    if x.stride() == standard_strides(x.shape):
        return args
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])


def standard_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def attach(model: nn.Module, config: CapreseConfig) -> nn.Module:
    """Replace the chosen layers' MLPs with Caprese blocks, in place; freeze the base."""
    if getattr(model, "_caprese", None) is not None:
        raise ValueError("caprese is already attached to this model: call caprese.detach first")
    check_family(model.config)
    text = text_config(model.config)
    layers = config.resolve_layers(len(decoder_layers(model)))
    config.check_rank(text.hidden_size)
    method = build_method(config.method, config.density)
    if config.quantizer is not None and config.quantizer != method.quantizer:
        raise AdapterError(
            f"this adapter was fitted against the quantizer {config.quantizer}, and caprese "
            f"{config.method} now quantizes with {method.quantizer}: its path corrects other "
            "weights. Distill it again (or use the caprese version that wrote it)")
    config = dataclasses.replace(config, layers=layers, fingerprint=fingerprint(model),
                                 quantizer=method.quantizer)
    for index in layers:
        check_gated_mlp(mlp_of(model, index), index)

    state = PhaseState()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    created = {}
    for index in layers:
        generator = torch.Generator().manual_seed(config.seed * LAYER_SEED_STRIDE + index)
        block = CapreseBlock(
            mlp_of(model, index),
            method,
            state,
            config.rank,
            config.init,
            generator,
            layer_index=index,
        )
        set_mlp(model, index, block)
        created[index] = block
    stack = decoder(model)  # hooked below the LM head, so model.model(...) sees phases too
    hooks = [
        stack.register_forward_pre_hook(
            PhaseHook(state, inspect.signature(stack.forward)), with_kwargs=True
        ),
        model.get_output_embeddings().register_forward_pre_hook(_contiguous_input),
    ]
    model._caprese = Handle(config, state, created, hooks, requires_grad)
    model.generate = types.MethodType(guarded_generate, model)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Put the original MLP modules back and undo every other change attach made."""
    handle = handle_of(model)
    for index, block in handle.blocks.items():
        block.release_layouts()
        set_mlp(model, index, block.mlp)
    for hook in handle.hooks:
        hook.remove()
    del model.generate  # the instance attribute set by attach; the class method shows again
    for name, param in model.named_parameters():
        param.requires_grad_(handle.requires_grad.get(name, param.requires_grad))
    del model._caprese
    return model


def config_of(model: nn.Module) -> CapreseConfig:
    return handle_of(model).config


def reselection(model: nn.Module) -> int | None:
    """GRIFFIN's rho on this model (CapreseConfig.reselect_every); None when never, or when
    nothing is attached."""
    handle = getattr(model, "_caprese", None)
    return None if handle is None else handle.config.reselect_every


def decode_reselection(model: nn.Module, compile: str | None = None
                       ) -> tuple[contextlib.AbstractContextManager, int | None]:
    """How a decode loop reselects GRIFFIN's neurons: (the context to run it in, rho or None).
    rho = 0 is the full model, so the loop runs as the teacher and reselects nothing; compiled
    decoding runs fixed steps and cannot reselect."""
    every = reselection(model)
    if every is not None and compile:
        raise ValueError("compiled decoding runs fixed steps: it cannot reselect GRIFFIN's "
                         "neurons (reselect_every); drop one of the two")
    if every == 0:
        return teacher(model), None
    return contextlib.nullcontext(), every


def set_reselection(model: nn.Module, every: int | None) -> None:
    """Reselect GRIFFIN's neurons every `every` generated tokens from now on (None: never;
    0: the full model). A decode-time choice: an adapter loads with its own, this overrides."""
    handle = handle_of(model)
    handle.config = dataclasses.replace(handle.config, reselect_every=every)


def save(model: nn.Module, directory: str | os.PathLike, trained: dict | None = None,
         dtype: torch.dtype | None = None) -> Path:
    """Write the adapter (L, R per layer + config) to `directory`; returns its path.
    `trained` says what produced the weights (distillation writes {"stage": ...}). `dtype`
    stores L and R rounded to it (default: float32, as trained); a model computes the path in
    its own dtype, so a bf16 file gives a bf16 model exactly what the float32 one gives."""
    config = config_of(model)
    if config.rank is None:
        raise ValueError("this model has the method alone (rank=None): there is nothing to save")
    directory = Path(directory)
    _refuse_foreign_files(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.to(dtype or tensor.dtype)
               for key, tensor in lowrank_tensors(model).items()}
    weights = directory / WEIGHTS_FILE
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "caprese"}))
    record = json.loads(config.to_json())
    record.update(weights_sha256=sha256_file(weights), format=ADAPTER_FORMAT,
                  caprese_version=__version__, trained=trained or {})
    text = json.dumps(record, indent=2, sort_keys=True)
    atomic_write_text(directory / CONFIG_FILE, text)
    return directory


def _refuse_foreign_files(directory: Path) -> None:
    """save() replaces an adapter, never files of the same names that caprese did not write."""
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory} is a file, not a folder: choose another adapter folder")
    weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if weights.exists():
        try:
            with safe_open(weights, "pt") as handle:
                ours = (handle.metadata() or {}).get("format") == "caprese"
        except (SafetensorError, OSError):
            ours = False
        if not ours:
            raise AdapterError(f"{weights} exists and was not written by caprese: choose another "
                               "folder (caprese never overwrites files it did not write)")
    if config.exists():
        try:
            read_adapter(directory)
        except AdapterError as error:
            raise AdapterError(f"{config} exists and is not a caprese adapter config: choose "
                               "another folder (caprese never overwrites files it did not "
                               "write)") from error


def lowrank_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """L and R of every block under the adapter file's names, on the CPU."""
    return {f"layers.{index}.{name}": getattr(block, name).detach().to("cpu").contiguous()
            for index, block in blocks(model).items() for name in ("L", "R")}


def read_adapter(directory: str | os.PathLike) -> AdapterInfo:
    """The adapter's config and record; format 1 (before caprese 0.2) had no version fields.
    Anything that is not a valid record is an AdapterError that names the file."""
    path = ready_adapters.resolve(directory) / CONFIG_FILE  # a folder, or builtin:MODEL/METHOD
    if not path.is_file():
        raise AdapterError(f"{path} not found: is {directory} a caprese adapter directory?")
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("the file must hold a JSON object")
        fields = {key: record.pop(key) for key in RECORD_KEYS if key in record}
        _check_record(fields)
        config = CapreseConfig.from_json(json.dumps(record))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise AdapterError(f"{path} is not a valid caprese config: {error}") from error
    written = fields.get("format", 1)
    if written > ADAPTER_FORMAT:
        raise AdapterError(
            f"{path} is adapter format {written}, written by caprese "
            f"{fields.get('caprese_version')}; this caprese {__version__} reads formats up to "
            f"{ADAPTER_FORMAT}: upgrade caprese"
        )
    return AdapterInfo(config, fields["weights_sha256"], written, fields.get("caprese_version"),
                       fields.get("trained") or {})


def _check_record(fields: dict) -> None:
    checksum = fields.get("weights_sha256")
    if not (isinstance(checksum, str) and len(checksum) == 64
            and all(c in "0123456789abcdef" for c in checksum)):
        raise ValueError(f"weights_sha256 must be a sha256 hex digest, got {checksum!r}")
    written = fields.get("format", 1)
    if isinstance(written, bool) or not isinstance(written, int) or written < 1:
        raise ValueError(f"format must be a positive integer, got {written!r}")
    if not isinstance(fields.get("caprese_version", ""), (str, type(None))):
        raise ValueError(f"caprese_version must be text, got {fields['caprese_version']!r}")
    if not isinstance(fields.get("trained", {}), (dict, type(None))):
        raise ValueError(f"trained must be a JSON object, got {fields['trained']!r}")


def read_config(directory: str | os.PathLike) -> tuple[CapreseConfig, str]:
    """The adapter's config and the checksum recorded for its weights."""
    info = read_adapter(directory)
    return info.config, info.weights_sha256


def _check_fingerprint(expected: dict, model: nn.Module) -> None:
    actual = fingerprint(model)
    differences = [
        f"{key}: adapter {expected.get(key)!r}, model {actual.get(key)!r}"
        for key in sorted(set(expected) | set(actual))
        if expected.get(key) != actual.get(key)
    ]
    if differences:
        raise AdapterError(
            "adapter was made for a different model architecture (" + "; ".join(differences) + ")"
        )


def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the saved config to `model` and fill in the saved L and R. A refused adapter
    raises AdapterError and leaves the model as it was."""
    config, _ = read_config(directory)
    if config.rank is None:
        raise AdapterError(f"{directory} has no low-rank path (rank null): nothing to load; "
                           "attach the method alone with caprese.attach instead")
    _check_fingerprint(config.fingerprint, model)
    try:
        attach(model, config)
    except ValueError as error:  # layers or rank that do not fit this model
        raise AdapterError(f"{directory} does not fit this model: {error}") from error
    try:
        load_weights(model, directory)
    except BaseException:
        detach(model)
        raise
    return model


def load_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Fill an attached model's L and R from an adapter saved with the same config."""
    config, checksum = read_config(directory)
    attached = config_of(model)
    differs = [f.name for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(attached, f.name)]
    if differs:
        raise AdapterError(
            f"{directory} was saved with another caprese config than the one attached to this "
            f"model: it has {', '.join(f'{name}={getattr(config, name)}' for name in differs)}; "
            "attach the same config (CLI: the same --method, --density, --rank, --layers, model)"
        )
    weights = ready_adapters.resolve(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{weights} not found: the adapter directory is incomplete")
    if sha256_file(weights) != checksum:
        raise AdapterError(
            f"{weights} does not match the checksum in {CONFIG_FILE}: the file is corrupt, "
            "truncated or from another save; save the adapter again"
        )
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{weights} is not a readable safetensors file: {error}") from error
    fill_lowrank(model, tensors, weights)
    return model


@torch.no_grad()
def fill_lowrank(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy lowrank_tensors-named L and R into every block; `source` names them in errors."""
    expected, checked = set(), {}
    for index, block in blocks(model).items():
        for name in ("L", "R"):
            key = f"layers.{index}.{name}"
            expected.add(key)
            param = getattr(block, name)
            if key not in tensors:
                raise AdapterError(f"{source} has no tensor {key}")
            tensor = tensors[key]
            if tensor.shape != param.shape:
                raise AdapterError(
                    f"{source}: {key} has shape {tuple(tensor.shape)}, the model needs "
                    f"{tuple(param.shape)}"
                )
            if not tensor.is_floating_point():
                raise AdapterError(f"{source}: {key} holds {tensor.dtype} values; L and R are "
                                   "floating point: the file was not written by caprese.save")
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{source}: {key} holds NaN or infinite values; the adapter "
                                   "is broken (distill it again, or load an earlier stage)")
            checked[key] = tensor
    extra = sorted(set(tensors) - expected)
    if extra:
        raise AdapterError(f"{source} has tensors for layers the config does not list: {extra}")
    for index, block in blocks(model).items():  # every tensor checked before any is copied
        for name in ("L", "R"):
            getattr(block, name).copy_(checked[f"layers.{index}.{name}"])
