"""How fast this machine multiplies matrices in each dtype, in GFLOPS: the number that decides
whether bf16 or fp32 distills and evaluates faster, and so which main-job preset fits.

The shape is qwen2.5-coder-1.5b's up projection (hidden 1536, intermediate 8960) at several row
counts: a 2048-token prefill or statistics batch, and decode steps of 1 to 128 sequences
(the evaluation batch: a step costs the weights' read plus the rows' products, so the rate
tells how many rows a step takes before it gets slower). One weight, reused: compute rates,
not the memory-bound rates of a single decode token (benchmarks/gemv_kernels.py). Each
product is timed once per round, in 9 rounds (after one untimed call each); the median counts.

    python benchmarks/matmul_rate.py --out benchmarks/results/matmul_rate_<cpu>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from caprese.bench.latency import median_seconds
from caprese.io import atomic_write_text
from caprese.kernels.cpu import machine

ROWS = {"prefill (2048 tokens)": 2048, **{f"decode (batch {n})": n for n in (1, 20, 32, 64, 128)}}
HIDDEN, INTERMEDIATE = 1536, 8960
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rates(rounds: int = 9) -> dict[tuple[str, str], float]:
    """{(product, dtype): GFLOPS} of x (rows x hidden) times W^T (hidden x intermediate), as
    nn.Linear computes it. Every product is timed once per round, rounds one after the other,
    so a slow spell of a shared machine hits them all alike; the median over rounds counts."""
    cases = {}
    for name, rows in ROWS.items():
        for dtype, torch_dtype in DTYPES.items():
            x = torch.randn(rows, HIDDEN, dtype=torch_dtype)
            weight = torch.randn(INTERMEDIATE, HIDDEN, dtype=torch_dtype)
            cases[name, dtype] = (rows, x, weight)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    for _ in range(rounds):
        for key, (_, x, weight) in cases.items():
            times[key].append(median_seconds(lambda x=x, w=weight: torch.nn.functional.linear(x, w),
                                             repeats=1, warmup=1))
    return {key: 2 * cases[key][0] * HIDDEN * INTERMEDIATE / statistics.median(times[key]) / 1e9
            for key in cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args()
    rows = []
    print(f"{machine()}, {torch.get_num_threads()} threads")
    print("| product | fp32 GFLOPS | bf16 GFLOPS | bf16 / fp32 |\n|---|---|---|---|")
    measured = rates()
    for name, count in ROWS.items():
        rate = {dtype: measured[name, dtype] for dtype in DTYPES}
        rows.append({"product": name, "rows": count, **rate})
        print(f"| {name} | {rate['fp32']:.0f} | {rate['bf16']:.0f} "
              f"| {rate['bf16'] / rate['fp32']:.2f} |")
    if args.out:
        atomic_write_text(args.out, json.dumps({"machine": machine(), "torch": torch.__version__,
                                                "threads": torch.get_num_threads(), "rows": rows},
                                               indent=1))


if __name__ == "__main__":
    main()
