"""The Adam loop shared by layer-wise SGD and end-to-end distillation.

One optimizer step = `batch_size` sequences, processed `micro_batch` at a time (gradient
accumulation). Linear warm-up over the first `warmup` fraction of steps (at least
`min_warmup_steps`), then linear decay to zero (the paper's schedule). Checkpoints every
`checkpoint_every` steps or `checkpoint_minutes`, whichever comes first, and at the end; a
resumed run replays the same seeded data order and ends with the same adapter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from caprese import distributed, heap
from caprese.adapter import blocks
from caprese.distillation.checkpoint import (
    CheckpointClock,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from caprese.distillation.settings import TrainSettings
from caprese.io import append_log
from caprese.samples import Batch, Sample, collate, epoch_order

# loss_fn(batch, scale) backpropagates scale * (sum of per-token losses) and returns that
# sum (a float) and the number of continuation tokens.
LossFn = Callable[[Batch, float], tuple[float, int]]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def lr_factor(step: int, total: int, warmup: float, min_warmup_steps: int = 5) -> float:
    """Linear warm-up, then linear decay to zero.

    The warm-up never runs fewer than min_warmup_steps (nor more than all steps): Adam's first
    update moves every weight by the full lr whatever its gradient, so 2% of a 38-step run (one
    step) would start at full speed; the paper's 2% of thousands of steps never does."""
    warmup_steps = min(total, max(1, min_warmup_steps, round(warmup * total)))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total - step) / max(1, total - warmup_steps))


def lowrank_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    params = {}
    for index, block in blocks(model).items():
        params[f"layers.{index}.L"], params[f"layers.{index}.R"] = block.L, block.R
    return params


def train(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    loss_fn: LossFn,
    settings: TrainSettings,
    run_dir: Path,
    pad_id: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train L and R of every block; returns the loss of each step run in this call.

    on_step(step) runs after each optimizer step (benchmarks score held-out data there)."""
    params = lowrank_parameters(model)
    optimizer = torch.optim.Adam(params.values(), lr=settings.lr)
    steps_per_epoch = math.ceil(len(samples) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    step = _resume(run_dir, settings.name, params, optimizer)
    clock = CheckpointClock(settings.checkpoint_every, settings.checkpoint_minutes)
    losses: list[float] = []
    progress = tqdm(total=total, initial=step, desc=settings.name, unit="step",
                    disable=not distributed.is_main())
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        order = epoch_order(len(samples), settings.seed, epoch)
        chunk = [
            samples[i]
            for i in order[index * settings.batch_size : (index + 1) * settings.batch_size]
        ]
        tokens = sum(len(s.input_ids) - s.boundary for s in chunk)
        started = time.perf_counter()
        loss = _accumulate(chunk, loss_fn, settings.micro_batch, tokens, pad_id, params)
        grads = [p.grad for p in params.values() if p.grad is not None]
        if not math.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads):
            raise TrainingDiverged(
                f"{settings.name}: loss is {loss} at step {step}; the last good checkpoint in "
                f"{run_dir} is kept. Lower the learning rate and run again with --resume."
            )
        lr = settings.lr * lr_factor(step, total, settings.warmup, settings.min_warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - started
        losses.append(loss)
        if distributed.is_main():
            append_log(run_dir / "run_log.jsonl", {
                "stage": settings.name, "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                "tokens": tokens, "tokens_per_s": tokens / seconds, "time": time.time()})
        progress.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tokens / seconds:.0f}")
        progress.update()
        if clock.due(step, total) and distributed.is_main():
            _checkpoint(run_dir, settings.name, params, optimizer, step)
        if on_step is not None:
            on_step(step)
    progress.close()
    return losses


def _accumulate(chunk: Sequence[Sample], loss_fn: LossFn, micro_batch: int, tokens: int,
                pad_id: int, params: dict[str, torch.nn.Parameter]) -> float:
    """One optimizer step's gradient and mean loss over `chunk`, micro-batch by micro-batch.

    Under torchrun micro-batch j runs on rank j % N and the gradients and losses are summed
    over ranks: the global batch stays `chunk` whatever N, each micro-batch the same as one
    process's (only the order of the float32 sums differs)."""
    loss_sum = 0.0
    for index, start in enumerate(range(0, len(chunk), micro_batch)):
        if distributed.mine(index):
            part, _ = loss_fn(collate(chunk[start : start + micro_batch], pad_id), 1.0 / tokens)
            loss_sum += part
            heap.release()  # the next micro-batch's lengths differ: see caprese/heap.py
    if distributed.world_size() > 1:
        for param in params.values():
            if param.grad is None:  # no micro-batch on this rank
                param.grad = torch.zeros_like(param)
            distributed.all_reduce_sum_(param.grad)
        loss_sum = float(distributed.all_reduce_sum_(torch.tensor(loss_sum, dtype=torch.float64)))
    return loss_sum / tokens


def _checkpoint(run_dir, name, params, optimizer, step) -> None:
    tensors = {**{k: p.data for k, p in params.items()}, **optimizer_tensors(optimizer)}
    save_checkpoint(run_dir / "checkpoints", name, tensors, {"step": step})


@torch.no_grad()
def _resume(run_dir, name, params, optimizer) -> int:
    found = load_checkpoint(run_dir / "checkpoints", name)
    if found is None:
        return 0
    tensors, meta = found
    for key, param in params.items():
        param.copy_(tensors[key])
    restore_optimizer(optimizer, tensors)
    return int(meta["step"])
