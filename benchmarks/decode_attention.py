"""A compiled decode step's attention on the CPU: PyTorch's SDPA, transformers' eager attention
(which inductor fuses into the step), caprese's grouped-query attention (eager without its
copies of the KV heads) and the same with caprese's decode attention kernel (what compiled
CPU steps use), full model with caprese's kernels, per prompt length. Prefill runs
with the model's own attention (SDPA) for all; only the compiled decode step differs. The
attentions take turns in rounds of a few steps on one cache (the order reversing every
round), so that the machine's drift hits all alike; the table gives the median over rounds
of each round's median step, and of its ratio to SDPA's in the same round.

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
from caprese.io import atomic_write_text
from caprese.kernels.attention import DECODE, GROUPED
from caprese.kernels.cpu import machine
from caprese.models.load import load_model

ATTENTIONS = ("sdpa", "eager", GROUPED, DECODE)


def round_medians(model, prompt_len: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per attention, the median seconds of its `steps` compiled decode steps in each of
    `rounds` rounds (after a dropped round that compiles), all after one prompt of
    `prompt_len` random tokens."""
    name = phases.cache_argument(model)
    ids = torch.randint(100, 20000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = compiled.static_cache(model, prompt_len + (rounds + 1) * len(ATTENTIONS) * steps + 1,
                                  1)
    token = phases.prefill(model, ids, cache, 512).logits[:, -1].argmax(-1, keepdim=True)
    position, medians = prompt_len, {attention: [] for attention in ATTENTIONS}
    step_with = {attention: compiled.compiled_forward(model, "inductor", attention=attention)
                 for attention in ATTENTIONS}  # one compiled forward, switched per step
    for round_ in range(rounds + 1):
        for attention in ATTENTIONS if round_ % 2 else ATTENTIONS[::-1]:
            step = step_with[attention]
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                logits = step(input_ids=token, position_ids=torch.full((1, 1), position),
                              use_cache=True, logits_to_keep=1, **{name: cache}).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - started)
                position += 1
            if round_:
                medians[attention].append(statistics.median(times))
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6, help="steps per attention per round")
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args()
    model, _ = load_model(args.model, dtype=args.dtype)
    phases.use_decode_kernels(model)
    rows = []
    with torch.no_grad():
        for prompt_len in args.prompt_lens:
            medians = round_medians(model, prompt_len, args.rounds, args.steps)
            for attention, values in medians.items():
                rows.append({"prompt_len": prompt_len, "attention": attention,
                             "step_ms": 1e3 * statistics.median(values),
                             "to_sdpa": statistics.median(
                                 v / s for v, s in zip(values, medians["sdpa"], strict=True)),
                             "round_ms": [1e3 * v for v in values]})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"{args.model}, {args.dtype}, batch 1, compiled (inductor), caprese's kernels, "
          f"{torch.get_num_threads()} threads, {machine()}, commit {commit}; medians over "
          f"{args.rounds} rounds of {args.steps} steps per attention")
    print("| prompt | attention | step ms | / SDPA (same round) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['prompt_len']} | {row['attention']} | {row['step_ms']:.1f} | "
              f"{row['to_sdpa']:.3f} |")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(
            {"machine": machine(), "threads": torch.get_num_threads(), "commit": commit,
             "model": args.model, "dtype": args.dtype,
             "command": " ".join(["python", "benchmarks/decode_attention.py", *sys.argv[1:]]),
             "rows": rows},
            indent=2))


if __name__ == "__main__":
    main()
