"""Where a compiled CPU decode step's time goes: torch.profiler over decode steps of a variant
(default: the full model with caprese's kernels), per operator (each product shape apart),
after one prompt.
The table gives each operator's self time per step and its share of the steps' wall time;
what the compiled graph does itself (norms, rotary embeddings, residuals: inductor's own
C++ code) shows as its "Call CompiledFxGraph" row.

    python benchmarks/step_profile.py --model qwen2.5-coder-1.5b-instruct --prompt-len 256 \
        [--variant cats:k] [--attention caprese_grouped] \
        --out benchmarks/results/step_profile_<cpu>.json

`--variant` takes `caprese bench`'s variant names (density 0.5, an untrained path of rank
256, as the bench's). `--attention` runs the steps with another attention implementation
(default: what compiled CPU steps use, caprese.compiled.DECODE_ATTENTION). The profiler adds
its own cost per operator, so read the shares, not the wall time, against other runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from caprese import compiled, phases
from caprese.bench.latency import variant
from caprese.kernels.cpu import machine
from caprese.models.load import load_model


def profiled_steps(model, prompt_len: int, steps: int, attention: str | None):
    """The profiler's events over `steps` compiled decode steps (after a prompt of
    `prompt_len` random tokens and two steps that compile), and their wall seconds."""
    name = phases.cache_argument(model)
    ids = torch.randint(100, 20000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = compiled.static_cache(model, prompt_len + steps + 3, 1)
    token = phases.prefill(model, ids, cache, 512).logits[:, -1].argmax(-1, keepdim=True)
    step = compiled.compiled_forward(model, "inductor", attention=attention)
    position = prompt_len

    def decode() -> None:
        nonlocal token, position
        logits = step(input_ids=token, position_ids=torch.full((1, 1), position),
                      use_cache=True, logits_to_keep=1, **{name: cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        position += 1

    decode(), decode()  # compiles
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        started = time.perf_counter()
        for _ in range(steps):
            decode()
        seconds = time.perf_counter() - started
    return profiler.key_averages(group_by_input_shape=True), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--variant", default="full:k", help="a `caprese bench` variant")
    parser.add_argument("--attention", help="attention implementation for the steps")
    parser.add_argument("--rows", type=int, default=12, help="operators in the table")
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args()
    model, _ = load_model(args.model, dtype=args.dtype)
    with torch.no_grad(), variant(model, args.variant, density=0.5, rank=256, adapter=None):
        averages, seconds = profiled_steps(model, args.prompt_len, args.steps, args.attention)
    step_ms = 1e3 * seconds / args.steps
    rows = [{"operator": a.key, "shapes": str(a.input_shapes), "calls_per_step":
             a.count / args.steps, "self_ms_per_step": a.self_cpu_time_total / 1e3 / args.steps}
            for a in averages]
    rows.sort(key=lambda row: -row["self_ms_per_step"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    attention = args.attention or compiled.DECODE_ATTENTION["cpu"]
    print(f"{args.model} as {args.variant}, {args.dtype}, batch 1, prompt {args.prompt_len}, "
          f"compiled (inductor), {attention} attention, {torch.get_num_threads()} threads, "
          f"{machine()}, commit {commit}; {args.steps} steps, {step_ms:.1f} ms per step profiled")
    print("| operator | input shapes | calls per step | self ms per step | of the step |")
    print("|---|---|---|---|---|")
    for row in rows[:args.rows]:
        print(f"| {row['operator']} | {row['shapes'][:60]} | {row['calls_per_step']:.0f} | "
              f"{row['self_ms_per_step']:.2f} | {row['self_ms_per_step'] / step_ms:.1%} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {"machine": machine(), "threads": torch.get_num_threads(), "commit": commit,
             "model": args.model, "variant": args.variant, "dtype": args.dtype,
             "prompt_len": args.prompt_len,
             "attention": attention, "steps": args.steps, "step_ms": step_ms,
             "command": " ".join(["python", "benchmarks/step_profile.py", *sys.argv[1:]]),
             "rows": rows[:40]},
            indent=2))


if __name__ == "__main__":
    main()
