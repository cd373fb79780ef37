"""Issue-4 probe: how the closed form's ridge and rank move the KL gap.

The statistics C = X^T X and B = X^T Y are collected once per method; every (ridge, rank)
is then a ~1 s solve plus one scoring pass on the held-out samples. lambda = ridge *
trace(C) / D. Ranks above the adapter's r = 256 are not Caprese's budget: they say how much
of the gap any linear path fitted layer by layer could close (D - 1, the largest rank an
adapter takes, is within one direction of an unconstrained D x D map). Same model, data and
split as distill_quality.py (GSM8K + MATH training mixture, seed 0). Prints a table and
writes benchmarks/results/ridge_sweep.json (rewritten after each row, so a cut-short run
keeps what it measured).

    python benchmarks/ridge_sweep.py --model qwen2.5-coder-0.5b-instruct \
        --ridges 1e-6,1e-5,1e-4,1e-3
    python benchmarks/ridge_sweep.py --ridges 1e-4 --ranks 256,512,895 \
        --out benchmarks/results/rank_sweep.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import caprese
from caprese.adapter import blocks
from caprese.distillation.layerwise import collect_stats, solve_closed_form
from caprese.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_quality import RESULTS, add_setup_args, load_setup, scored  # noqa: E402


@torch.no_grad()
def apply_closed_form_at(model, stats, ridge: float, rank: int) -> None:
    """The rank-`rank` closed form in an adapter at least that wide: L's other columns and
    R's other rows are zero, so x L R is exactly the rank-`rank` product."""
    for index, block in blocks(model).items():
        left, right = solve_closed_form(stats[index], rank, ridge)
        block.L.zero_()
        block.R.zero_()
        block.L[:, :rank] = left
        block.R[:rank] = right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(parser)
    parser.add_argument("--ridges", default="1e-6,1e-5,1e-4,1e-3")
    parser.add_argument("--ranks", default=None,
                        help="comma-separated ranks (default: --rank alone)")
    parser.add_argument("--work", default="/tmp/caprese-ridge-sweep")
    parser.add_argument("--save-adapters", metavar="DIR",
                        help="save each method's last (ridge, rank) fit as DIR/<method>, a "
                        "layer-wise adapter e2e_steps.py --layerwise can start from")
    parser.add_argument("--out", default=str(RESULTS / "ridge_sweep.json"))
    args = parser.parse_args()
    ridges = [float(r) for r in args.ridges.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [args.rank]

    model, tokenizer, train, held_out, setup = load_setup(args)
    pad_id = tokenizer.pad_token_id or 0
    report = {"setup": setup, "methods": {}}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    for method in args.methods.split(","):
        caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density,
                                                    rank=max(ranks)))
        rows = report["methods"].setdefault(method, {})
        rows["method alone"] = {**scored(model, held_out, pad_id, args.batch_size),
                                "kl_gap_closed": 0.0}
        started = time.perf_counter()
        stats = collect_stats(model, train, args.batch_size, work / method, "stats-train",
                              checkpoint_every=10**6, pad_id=pad_id)
        rows["method alone"]["stats_s"] = time.perf_counter() - started
        for ridge in ridges:
            for rank in ranks:
                apply_closed_form_at(model, stats, ridge, rank)
                row = {"ridge": ridge, "rank": rank,
                       **scored(model, held_out, pad_id, args.batch_size)}
                row["kl_gap_closed"] = 1 - row["kl"] / rows["method alone"]["kl"]
                name = f"closed form, ridge {ridge:g}" + (f", rank {rank}" if args.ranks else "")
                rows[name] = row
                atomic_write_text(Path(args.out), json.dumps(report, indent=2))
                print_row(method, name, row)
        if args.save_adapters:
            caprese.save(model, Path(args.save_adapters) / method)
        caprese.detach(model)


def print_row(method: str, name: str, row: dict) -> None:
    print(f"| {method} | {name} | KL {row['kl']:.4f} | top-1 {100 * row['top1']:.1f}% | "
          f"gap closed {100 * row['kl_gap_closed']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
