"""Layer-wise distillation: each layer's x L R fits FF(x) - FFhat(x) on original inputs.

Two solvers:
- closed_form: the exact optimum of the rank-r least squares, from one pass of statistics.
  With C = X^T X and B = X^T Y, the ridge solution is W = (C + lambda I)^-1 B; the best rank-r
  map on the data is W V_r V_r^T, V_r the top-r eigenvectors of W^T C W; so L = W V_r, R = V_r^T
  (rescaled so both factors have equal column/row norms). lambda = ridge * trace(C) / D.
- sgd: the paper's recipe, Adam on L and R with a linear schedule (trainer.py). A "batch"
  counts sequences, like the paper's end-to-end batch and the data loader; each optimizer
  step averages the loss over all continuation tokens of its sequences.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from caprese import distributed, heap
from caprese.adapter import blocks
from caprese.capture import capture
from caprese.distillation.checkpoint import CheckpointClock, load_checkpoint, save_checkpoint
from caprese.distillation.harm import keep_helpful
from caprese.distillation.settings import DistillSettings
from caprese.distillation.stats import RegressionStats
from caprese.distillation.trainer import LossFn, train
from caprese.io import append_log
from caprese.samples import Sample, collate

log = logging.getLogger(__name__)


def collect_stats(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    batch_size: int,
    run_dir: Path,
    name: str,
    checkpoint_every: int = 50,
    pad_id: int = 0,
    checkpoint_minutes: float = 10.0,
) -> dict[int, RegressionStats]:
    """Per-layer statistics over `samples`, in one resumable teacher pass. Under torchrun
    each rank takes whole batches (batch i on rank i % N) and the sums are all-reduced in
    float64 at each checkpoint and at the end: the result differs from one process's only
    in the order of float64 additions."""
    layers = blocks(model)
    hidden = next(iter(layers.values())).mlp.up_proj.weight.shape[1]
    checkpoints = run_dir / "checkpoints"
    stats = {i: RegressionStats.zeros(hidden) for i in layers}
    start = 0
    found = load_checkpoint(checkpoints, name)
    if found is not None:
        tensors, meta = found
        if distributed.is_main():  # the checkpoint holds every rank's sums: count them once
            stats = {i: RegressionStats.from_tensors(tensors, f"layers.{i}") for i in layers}
        start = int(meta["batches"])
    total = (len(samples) + batch_size - 1) // batch_size
    progress = tqdm(total=total, initial=start, desc=name, unit="batch",
                    disable=not distributed.is_main())
    reduced = stats
    clock = CheckpointClock(checkpoint_every, checkpoint_minutes)
    for index in range(start, total):
        if distributed.mine(index):
            batch = collate(samples[index * batch_size:(index + 1) * batch_size], pad_id)
            capture(model, batch, lambda i, x, y: stats[i].add(x, y))
            heap.release()
        progress.update()
        done = index + 1
        if clock.due(done, total):
            reduced = {i: layer_stats.all_reduced() for i, layer_stats in stats.items()}
            if distributed.is_main():
                tensors = {}
                for i, layer_stats in reduced.items():
                    tensors.update(layer_stats.tensors(f"layers.{i}"))
                save_checkpoint(checkpoints, name, tensors, {"batches": done})
    progress.close()
    return reduced


def solve_closed_form(
    stats: RegressionStats, rank: int, ridge: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) minimising ||Y - X L R||^2 + lambda ||L R||^2 over rank-r products."""
    if stats.tokens == 0:
        raise ValueError("no continuation tokens reached this layer: nothing to fit")

    c = stats.xx / stats.tokens
    b = stats.xy / stats.tokens
    hidden = c.shape[0]
    lam = ridge * torch.trace(c) / hidden
    w = torch.linalg.solve(c + lam * torch.eye(hidden, dtype=c.dtype), b)
    m = w.t() @ c @ w
    _, vectors = torch.linalg.eigh((m + m.t()) / 2)
    top = vectors[:, -rank:].flip(-1)  # (D, r), largest first
    left = w @ top
    scale = left.norm(dim=0).clamp_min(1e-12).sqrt()
    return (left / scale).float(), (top.t() * scale[:, None]).float()


@torch.no_grad()
def apply_closed_form(model, stats: dict[int, RegressionStats], ridge: float) -> None:
    some = next(iter(stats.values()))
    if some.tokens < 10 * some.xx.shape[0]:
        log.warning("only %d tokens for %d-dimensional regressions: the closed form will "
                    "overfit; use more --samples or a larger --ridge", some.tokens,
                    some.xx.shape[0])
    for index, block in blocks(model).items():
        left, right = solve_closed_form(stats[index], block.L.shape[1], ridge)
        block.L.copy_(left)
        block.R.copy_(right)


def sgd_loss(model: torch.nn.Module) -> LossFn:
    """Sum over layers of each token's mean squared residual, from one capture pass."""
    layers = blocks(model)

    def loss_fn(batch, scale):
        total, tokens = 0.0, 0

        def on_layer(index, x, y):
            nonlocal total, tokens
            block = layers[index]
            with torch.enable_grad():
                residual = y.float() - (x.float() @ block.L) @ block.R
                per_token = residual.pow(2).mean(dim=-1).sum()
                (per_token * scale).backward()
            total += per_token.item()
            tokens = x.shape[0]

        capture(model, batch, on_layer)
        return total, tokens

    return loss_fn


def residual_report(model, train_stats, held_out_stats) -> list[dict]:
    """Per layer ||Y - X L R|| / ||Y||: before (the method alone, L R = 0) and after."""
    rows = []
    for index, block in blocks(model).items():
        product = (block.L @ block.R).detach()
        row = {
            "layer": index,
            "train_tokens": train_stats[index].tokens,
            "train_before": train_stats[index].relative_error(None),
            "train_after": train_stats[index].relative_error(product),
        }
        if held_out_stats:
            row.update(
                held_out_tokens=held_out_stats[index].tokens,
                held_out_before=held_out_stats[index].relative_error(None),
                held_out_after=held_out_stats[index].relative_error(product),
            )
        rows.append(row)
    return rows


def run_layerwise(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    held_out: Sequence[Sample],
    settings: DistillSettings,
    run_dir: Path,
    pad_id: int = 0,
) -> tuple[list[dict], dict]:
    """Statistics pass, then closed form and/or SGD, then each layer's path cut back to what
    helps on the held-out samples (harm.keep_helpful); returns the residual report (after
    the cut) and timings."""
    solver, batch_size, every = settings.solver, settings.capture_batch, settings.checkpoint_every
    timings = {}
    started = time.perf_counter()
    minutes = settings.checkpoint_minutes
    train_stats = collect_stats(model, samples, batch_size, run_dir, "stats-train", every, pad_id,
                                minutes)
    timings["stats_s"] = time.perf_counter() - started
    if solver in ("closed_form", "closed_form+sgd"):
        started = time.perf_counter()
        apply_closed_form(model, train_stats, settings.ridge)
        timings["solve_s"] = time.perf_counter() - started
    if solver in ("sgd", "closed_form+sgd"):
        started = time.perf_counter()
        train(model, samples, sgd_loss(model), settings.train_settings("sgd"), run_dir, pad_id)
        timings["sgd_s"] = time.perf_counter() - started
    started = time.perf_counter()
    held_stats = (collect_stats(model, held_out, batch_size, run_dir, "stats-held-out", every,
                                pad_id, minutes) if held_out else {})
    timings["held_out_stats_s"] = time.perf_counter() - started
    kept = keep_helpful(model, held_stats, ordered=solver == "closed_form") if held_stats else []
    report = residual_report(model, train_stats, held_stats)
    for row, kept_row in zip(report, kept or [{}] * len(report), strict=True):
        row.update({k: kept_row[k] for k in ("rank", "kept_rank", "held_out_full_rank")
                    if k in kept_row})
        append_log(run_dir / "run_log.jsonl", {"stage": "layerwise", **row})
    return report, timings
