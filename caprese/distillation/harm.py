"""Do no harm: a path stays only where it brings the model closer to the original.

A low-rank path fitted on finite data can make a layer worse on text it was not fitted on
(too high a rank for the tokens seen, or a correction that does not generalise). After the
layer-wise fit, each layer's path is scored on held-out samples against the method alone
(L R = 0), by the same relative MLP error the fit minimises, and cut back to the rank that
scores best: a prefix of the closed form's components (they come ordered by how much of the
residual they explain), or none. A cut path stays cut through E2E: with both factors zero
outside the kept rank, their gradients are zero there too.

After the last stage, the whole adapter is scored on the model's outputs: KL(original ||
compressed) of the next-token distributions on the held-out samples, with the path and without
it (one teacher pass serves both), for math and general text apart. An adapter that ends worse
than the method alone is reported as such. The check checkpoints its sums like a statistics
pass: on a 2-core CPU it is hours of work for a 1.5B model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from caprese import distributed, heap
from caprese.adapter import blocks
from caprese.data.general import SOURCE as GENERAL_SOURCE
from caprese.distillation.checkpoint import CheckpointClock, load_checkpoint, save_checkpoint
from caprese.distillation.stats import RegressionStats
from caprese.divergence import batch_divergence, teacher_hidden
from caprese.samples import Sample, collate

CHECK = "adapter-check"  # the check's checkpoint name


def rank_candidates(rank: int, ordered: bool) -> list[int]:
    """Ranks to try, largest first: halvings down to 8 when the components are ordered
    (closed form), else the full rank; always 0 (no path)."""
    found = [rank]
    while ordered and found[-1] // 2 >= 8:
        found.append(found[-1] // 2)
    return [*found, 0]


@torch.no_grad()
def truncate_rank(block, rank: int) -> None:
    """Keep the first `rank` components of a block's path (0: no path)."""
    block.L[:, rank:] = 0
    block.R[rank:] = 0


@torch.no_grad()
def keep_helpful(model: torch.nn.Module, held_out: dict[int, RegressionStats],
                 ordered: bool) -> list[dict]:
    """Cut each layer's path to the candidate rank with the lowest held-out error (the
    method alone scores 1.0); one row per layer: the rank kept and the errors."""
    rows = []
    for index, block in blocks(model).items():
        stats = held_out[index]
        rank = block.L.shape[1]
        errors = {k: (stats.relative_error(block.L[:, :k] @ block.R[:k]) if k else 1.0)
                  for k in rank_candidates(rank, ordered)}
        kept = min(errors, key=lambda k: (errors[k], -k))  # ties: the larger rank
        truncate_rank(block, kept)
        rows.append({"layer": index, "rank": rank, "kept_rank": kept,
                     "held_out_method": 1.0, "held_out_full_rank": errors[rank],
                     "held_out_kept": errors[kept]})
    return rows


@torch.no_grad()
def drop_harmful(model: torch.nn.Module, report: list[dict]) -> list[dict]:
    """For fits whose components are not ordered (the sequential solver, whose report holds
    each layer's held-out error before and after): a path that does not lower it goes."""
    layers = blocks(model)
    rows = []
    for row in report:
        block = layers[row["layer"]]
        rank = block.L.shape[1]
        helps = row.get("held_out_after", 0.0) < row.get("held_out_before", 1.0)
        if not helps:
            truncate_rank(block, 0)
        rows.append({"layer": row["layer"], "rank": rank, "kept_rank": rank if helps else 0,
                     "held_out_method": row.get("held_out_before"),
                     "held_out_full_rank": row.get("held_out_after"),
                     "held_out_kept": row.get("held_out_after") if helps else 1.0})
    return rows


def kept_summary(rows: list[dict]) -> dict:
    """Which layers kept their full rank, which a smaller one, which none."""
    return {"full_rank": [r["layer"] for r in rows if r["kept_rank"] == r["rank"]],
            "reduced": {str(r["layer"]): r["kept_rank"] for r in rows
                        if 0 < r["kept_rank"] < r["rank"]},
            "dropped": [r["layer"] for r in rows if r["kept_rank"] == 0]}


@contextlib.contextmanager
def path_off(model: torch.nn.Module) -> Iterator[None]:
    """The efficient method alone: every path's R set to zero, then put back."""
    saved = {i: block.R.detach().clone() for i, block in blocks(model).items()}
    with torch.no_grad():
        for block in blocks(model).values():
            block.R.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for index, block in blocks(model).items():
                block.R.copy_(saved[index])


@torch.no_grad()
def adapter_check(model: torch.nn.Module, held_out: Sequence[Sample], batch_size: int,
                  pad_id: int = 0, run_dir: Path | None = None, checkpoint_every: int = 50,
                  checkpoint_minutes: float = 10.0) -> dict:
    """Held-out KL(original || compressed) per token with the path and without it, for math
    and general text apart; "worse_than_method" when the path raises it on either. With a
    `run_dir`, the sums are checkpointed there and a rerun continues from them."""
    parts = {"math": [s for s in held_out if getattr(s, "source", "") != GENERAL_SOURCE],
             "general": [s for s in held_out if getattr(s, "source", "") == GENERAL_SOURCE]}
    work = [(name, samples[start:start + batch_size]) for name, samples in parts.items()
            for start in range(0, len(samples), batch_size)]
    # per part: KL sum without the path, KL sum with it, scored tokens
    sums = {name: torch.zeros(3, dtype=torch.float64) for name, samples in parts.items()
            if samples}
    done = 0
    found = load_checkpoint(run_dir / "checkpoints", CHECK) if run_dir else None
    if found is not None:
        tensors, meta = found
        sums, done = {name: tensors[name] for name in sums}, int(meta["batches"])
    clock = CheckpointClock(checkpoint_every, checkpoint_minutes)
    device = next(model.parameters()).device
    progress = tqdm(total=len(work), initial=done, desc="adapter check", unit="batch",
                    disable=not distributed.is_main())
    for index in range(done, len(work)):
        name, chunk = work[index]
        batch = collate(chunk, pad_id).to(device)
        target = teacher_hidden(model, batch)
        with path_off(model):
            method = batch_divergence(model, batch, target)
        caprese = batch_divergence(model, batch, target)
        sums[name] += torch.tensor([method["kl"], caprese["kl"], caprese["tokens"]],
                                   dtype=torch.float64)
        if run_dir is not None and clock.due(index + 1, len(work)) and distributed.is_main():
            save_checkpoint(run_dir / "checkpoints", CHECK, sums, {"batches": index + 1})
        progress.update()
        heap.release()
    progress.close()
    result: dict = {}
    for name, (kl_method, kl_caprese, tokens) in sums.items():
        method, caprese = float(kl_method / max(tokens, 1)), float(kl_caprese / max(tokens, 1))
        result[name] = {"samples": len(parts[name]), "kl_method": method, "kl_caprese": caprese,
                        "change": caprese / method - 1 if method > 0 else 0.0}
    result["worse_than_method"] = any(part["kl_caprese"] > part["kl_method"]
                                      for part in result.values())
    return result


def verdict(check: dict, method: str) -> str:
    """One line for a terminal: better, or WORSE, than the method alone, and by how much."""
    parts = [f"{name} KL {p['kl_method']:.4f} -> {p['kl_caprese']:.4f} ({100 * p['change']:+.1f}%)"
             for name, p in check.items() if isinstance(p, dict)]
    if check["worse_than_method"]:
        return (f"WARNING: this adapter is WORSE than {method} alone on held-out text "
                f"({'; '.join(parts)}): do not use it; distill on more samples or a lower rank")
    return f"better than {method} alone on held-out text ({'; '.join(parts)})"
