"""A compiled decode step's attention on the CPU: PyTorch's SDPA against transformers' eager
attention (which inductor fuses into the step), full model with caprese's kernels, per
prompt length. Prefill runs with the model's own attention (SDPA) either way (eager attention
would hold every score of a long prompt); only the compiled decode step differs.

    python benchmarks/decode_attention.py --model qwen2.5-coder-1.5b-instruct \
        --prompt-lens 256 2048 [--dtype fp32] --out benchmarks/results/decode_attention_<cpu>.json
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
from caprese.bench.latency import machine
from caprese.models.load import load_model


def step_times(model, prompt_len: int, steps: int, attention: str) -> list[float]:
    """Seconds of each compiled decode step after a prompt of `prompt_len` random tokens."""
    name = phases.cache_argument(model)
    ids = torch.randint(100, 20000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = compiled.static_cache(model, prompt_len + steps + 1, 1)
    token = phases.prefill(model, ids, cache, 512).logits[:, -1].argmax(-1, keepdim=True)
    step = compiled.compiled_forward(model, "inductor", attention=attention)
    times = []
    for position in range(prompt_len, prompt_len + steps):
        started = time.perf_counter()
        logits = step(input_ids=token, position_ids=torch.full((1, 1), position),
                      use_cache=True, logits_to_keep=1, **{name: cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=16, help="timed steps after 3 untimed")
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args()
    model, _ = load_model(args.model, dtype=args.dtype)
    phases.use_decode_kernels(model)
    rows = []
    with torch.no_grad():
        for prompt_len in args.prompt_lens:
            for attention in ("sdpa", "eager"):
                times = step_times(model, prompt_len, args.steps + 3, attention)[3:]
                rows.append({"prompt_len": prompt_len, "attention": attention,
                             "step_ms": 1e3 * statistics.median(times)})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"{args.model}, {args.dtype}, batch 1, compiled (inductor), caprese's kernels, "
          f"{torch.get_num_threads()} threads, {machine()}, commit {commit}; "
          f"median of {args.steps} steps")
    print("| prompt | SDPA step ms | eager-attention step ms | eager / SDPA |")
    print("|---|---|---|---|")
    for sdpa, eager in zip(rows[::2], rows[1::2], strict=True):
        print(f"| {sdpa['prompt_len']} | {sdpa['step_ms']:.1f} | {eager['step_ms']:.1f} | "
              f"{eager['step_ms'] / sdpa['step_ms']:.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {"machine": machine(), "threads": torch.get_num_threads(), "commit": commit,
             "model": args.model, "dtype": args.dtype,
             "command": " ".join(["python", "benchmarks/decode_attention.py", *sys.argv[1:]]),
             "rows": rows},
            indent=2))


if __name__ == "__main__":
    main()
