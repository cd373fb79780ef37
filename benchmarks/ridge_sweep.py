"""Issue-4 probe: how the closed form's ridge (lambda = ridge * trace(C) / D) moves the KL gap.

The statistics C = X^T X and B = X^T Y are collected once per method; every ridge is then a
~1 s solve plus one scoring pass on the held-out samples. Same model, data and split as
distill_quality.py (GSM8K + MATH training mixture, seed 0). Prints a table and writes
benchmarks/results/ridge_sweep.json (rewritten after each row, so a cut-short run keeps what
it measured).

    python benchmarks/ridge_sweep.py --model qwen2.5-coder-0.5b-instruct \
        --ridges 1e-6,1e-5,1e-4,1e-3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import caprese
from caprese.distillation.layerwise import apply_closed_form, collect_stats
from caprese.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_quality import RESULTS, add_setup_args, load_setup, scored  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(parser)
    parser.add_argument("--ridges", default="1e-6,1e-5,1e-4,1e-3")
    parser.add_argument("--work", default="/tmp/caprese-ridge-sweep")
    parser.add_argument("--out", default=str(RESULTS / "ridge_sweep.json"))
    args = parser.parse_args()
    ridges = [float(r) for r in args.ridges.split(",")]

    model, pad_id, train, held_out, setup = load_setup(args)
    report = {"setup": setup, "methods": {}}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    for method in args.methods.split(","):
        caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density,
                                                    rank=args.rank))
        rows = report["methods"].setdefault(method, {})
        rows["method alone"] = {**scored(model, held_out, pad_id, args.batch_size),
                                "kl_gap_closed": 0.0}
        started = time.perf_counter()
        stats = collect_stats(model, train, args.batch_size, work / method, "stats-train",
                              checkpoint_every=10**6, pad_id=pad_id)
        rows["method alone"]["stats_s"] = time.perf_counter() - started
        for ridge in ridges:
            apply_closed_form(model, stats, ridge)
            row = {"ridge": ridge, **scored(model, held_out, pad_id, args.batch_size)}
            row["kl_gap_closed"] = 1 - row["kl"] / rows["method alone"]["kl"]
            rows[f"closed form, ridge {ridge:g}"] = row
            atomic_write_text(Path(args.out), json.dumps(report, indent=2))
            print_row(method, f"ridge {ridge:g}", row)
        caprese.detach(model)


def print_row(method: str, name: str, row: dict) -> None:
    print(f"| {method} | {name} | KL {row['kl']:.4f} | top-1 {100 * row['top1']:.1f}% | "
          f"gap closed {100 * row['kl_gap_closed']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
