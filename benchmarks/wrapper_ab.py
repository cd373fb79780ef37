"""Two ways to run a compiled CPU decode step, side by side: inductor's generated Python
wrapper against its C++ wrapper (caprese.compiled.CPU_OPTIONS), step by step on one cache.

Both steps are compiled on the same model after one prompt; then they take turns, one step
each, in alternating order, for --steps steps each. Their ratio per pair of neighbouring
steps shares the host's state (a shared machine's read rate changes from minute to minute),
so the paired median is the comparison; each variant gets a fresh prompt and cache.

    python benchmarks/wrapper_ab.py --model qwen2.5-coder-1.5b-instruct --prompt-len 256 \\
        --variants full:k griffin:k --out benchmarks/results/wrapper_ab_<cpu>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from caprese import compiled, phases
from caprese.bench.latency import variant
from caprese.kernels.cpu import machine
from caprese.models.load import load_model

WRAPPERS = {"python": {"cpp_wrapper": False}, "cpp": compiled.CPU_OPTIONS}


def paired_steps(model, prompt_len: int, steps: int) -> dict:
    """Seconds per step of each wrapper, steps taken in turn, and each one's compile time."""
    name = phases.cache_argument(model)
    ids = torch.randint(100, 20000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = compiled.static_cache(model, prompt_len + 2 * steps + 4, 1)
    token = phases.prefill(model, ids, cache, 512).logits[:, -1].argmax(-1, keepdim=True)
    position = prompt_len

    def step(run) -> float:
        nonlocal token, position
        started = time.perf_counter()
        logits = run(input_ids=token, position_ids=torch.full((1, 1), position),
                     use_cache=True, logits_to_keep=1, **{name: cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        position += 1
        return time.perf_counter() - started

    runs, compile_s = {}, {}
    for wrapper, options in WRAPPERS.items():
        runs[wrapper] = compiled.compiled_step_with(model, options)
        compile_s[wrapper] = step(runs[wrapper]) + step(runs[wrapper])
    seconds = {wrapper: [] for wrapper in WRAPPERS}
    for turn in range(steps):
        for wrapper in (list(WRAPPERS) if turn % 2 else list(WRAPPERS)[::-1]):
            seconds[wrapper].append(step(runs[wrapper]))
    return {"seconds": seconds, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="steps per wrapper and variant")
    parser.add_argument("--variants", nargs="+", default=["full:k"])
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args()
    model, _ = load_model(args.model, dtype=args.dtype)
    rows = []
    with torch.no_grad():
        for name in args.variants:
            torch._dynamo.reset()  # each variant compiles its own pair of steps
            with variant(model, name, density=0.5, rank=256, adapter=None):
                measured = paired_steps(model, args.prompt_len, args.steps)
            python, cpp = (measured["seconds"][w] for w in WRAPPERS)
            pairs = list(zip(python, cpp, strict=True))
            rows.append({"variant": name, "python_ms": 1e3 * statistics.median(python),
                         "cpp_ms": 1e3 * statistics.median(cpp),
                         "paired_ratio": statistics.median(c / p for p, c in pairs),
                         "mean_saved_ms": 1e3 * statistics.mean(p - c for p, c in pairs),
                         "compile_s": measured["compile_s"], "seconds": measured["seconds"]})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"{args.model}, {args.dtype}, batch 1, prompt {args.prompt_len}, {args.steps} steps "
          f"per wrapper, {torch.get_num_threads()} threads, {machine()}, commit {commit}")
    print("| variant | Python wrapper ms | C++ wrapper ms | C++ / Python (paired median) | "
          "mean saved ms | compile s (Python, C++) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['python_ms']:.2f} | {row['cpp_ms']:.2f} | "
              f"{row['paired_ratio']:.4f} | {row['mean_saved_ms']:.2f} | "
              f"{row['compile_s']['python']:.1f}, {row['compile_s']['cpp']:.1f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {"machine": machine(), "threads": torch.get_num_threads(), "commit": commit,
             "model": args.model, "dtype": args.dtype, "prompt_len": args.prompt_len,
             "steps": args.steps,
             "command": " ".join(["python", "benchmarks/wrapper_ab.py", *sys.argv[1:]]),
             "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
