"""Issue-4 follow-up: the sequential closed form's KL gap and cost against one teacher pass.

`--solver sequential` fits each layer on the compressed model's own inputs, toward the
original hidden states (caprese/distillation/sequential.py). Same model, data, split and
scoring as distill_quality.py (GSM8K + MATH training mixture, seed 0), so its rows compare
with that script's closed-form rows. Prints a table and writes
benchmarks/results/sequential_fit.json (rewritten after each method).

    python benchmarks/sequential_fit.py --model qwen2.5-coder-0.5b-instruct --methods griffin,cats
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import caprese
from caprese.distillation import DistillSettings, distill
from caprese.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_quality import (  # noqa: E402
    RESULTS,
    add_setup_args,
    load_setup,
    scored,
    teacher_pass_seconds,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(parser)
    parser.add_argument("--work", default="/tmp/caprese-sequential-fit")
    parser.add_argument("--out", default=str(RESULTS / "sequential_fit.json"))
    args = parser.parse_args()

    model, tokenizer, train, held_out, setup = load_setup(args)
    pad_id = tokenizer.pad_token_id or 0
    report = {"setup": setup, "methods": {},
              "teacher_pass_s": teacher_pass_seconds(model, train, args.batch_size, pad_id)}
    print(f"teacher pass over {len(train)} samples: {report['teacher_pass_s']:.0f} s", flush=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    for method in args.methods.split(","):
        caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density,
                                                    rank=args.rank))
        alone = scored(model, held_out, pad_id, args.batch_size)
        settings = DistillSettings(stages=("layerwise",), solver="sequential",
                                   capture_batch=args.batch_size)
        summary = distill(model, train, work / method, settings, held_out=held_out,
                          pad_id=pad_id)
        stage = summary["stages"]["layerwise"]
        fitted = scored(model, held_out, pad_id, args.batch_size)
        timings = stage["timings"]
        cost = (timings["train_s"] + timings["solve_s"]) / report["teacher_pass_s"]
        report["methods"][method] = {
            "method alone": alone,
            "sequential closed form": {**fitted, "kl_gap_closed": 1 - fitted["kl"] / alone["kl"],
                                       "timings": timings, "cost_vs_teacher_pass": cost,
                                       "peak_memory_gib": summary["peak_memory_gib"],
                                       "layers": stage["layers"]},
        }
        caprese.detach(model)
        atomic_write_text(Path(args.out), json.dumps(report, indent=2))
        print(f"| {method} | alone KL {alone['kl']:.4f} top-1 {100 * alone['top1']:.1f}% | "
              f"sequential KL {fitted['kl']:.4f} top-1 {100 * fitted['top1']:.1f}% | gap closed "
              f"{100 * (1 - fitted['kl'] / alone['kl']):.1f}% | train sweep "
              f"{timings['train_s']:.0f} s + solve {timings['solve_s']:.1f} s = {cost:.2f}x a "
              "teacher pass |", flush=True)


if __name__ == "__main__":
    main()
