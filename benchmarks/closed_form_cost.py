"""Cost of the closed-form layer-wise stage against one teacher pass, side by side.

Same data as distill_quality.py (1000 gsm8k + math samples cut at 256 tokens): one plain
forward of the original model (LM head included), then the closed-form statistics pass and
solve for one method. Prints the seconds and their ratio and writes
benchmarks/results/closed_form_cost_<method>.json.

    python benchmarks/closed_form_cost.py --method cats
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import caprese
from caprese.distillation.command import training_data
from caprese.distillation.layerwise import apply_closed_form, collect_stats
from caprese.io import atomic_write_text
from caprese.models import load_model, weights_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_quality import (  # noqa: E402
    RESULTS,
    add_dtype_arg,
    dtype_name,
    teacher_pass_seconds,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--method", default="cats")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    add_dtype_arg(parser)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    pad = tokenizer.pad_token_id or 0
    train, _ = training_data(tokenizer, ["gsm8k", "math"], args.samples, 200, 0, args.max_length)
    teacher = teacher_pass_seconds(model, train, args.batch_size, pad)
    caprese.attach(model, caprese.CapreseConfig(method=args.method, density=0.5, rank=256))
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        stats = collect_stats(model, train, args.batch_size, Path(run_dir), "stats-train",
                              10**6, pad)
        statistics = time.perf_counter() - started
    started = time.perf_counter()
    apply_closed_form(model, stats, 1e-4)
    solve = time.perf_counter() - started
    result = {"setup": {**vars(args), "weights": weights_description(args.model),
                        "dtype": dtype_name(args), "threads": torch.get_num_threads(),
                        "processor": platform.processor() or platform.machine()},
              "teacher_pass_s": teacher, "statistics_s": statistics, "solve_s": solve,
              "ratio": (statistics + solve) / teacher}
    out = RESULTS / f"closed_form_cost_{args.method}.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"| teacher pass | {teacher:.0f} s |\n| {args.method} statistics | {statistics:.0f} s |\n"
          f"| solve | {solve:.1f} s |\n| stage / teacher pass | "
          f"{result['ratio']:.2f}x |\n(written to {out})")


if __name__ == "__main__":
    main()
