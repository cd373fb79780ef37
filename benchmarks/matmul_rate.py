"""How fast this machine multiplies matrices in each dtype, in GFLOPS: the number that decides
whether bf16 or fp32 distills and evaluates faster, and so which main-job preset fits.

The shape is qwen2.5-coder-1.5b's up projection (hidden 1536, intermediate 8960) at two row
counts: a 2048-token prefill or statistics batch, and a 20-sequence decode step (the
evaluation batch). One weight, reused: compute rates, not the memory-bound rates of a
single decode token (benchmarks/gemv_kernels.py). Median of 7 after 2 untimed runs.

    python benchmarks/matmul_rate.py --out benchmarks/results/matmul_rate_<cpu>.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from caprese.bench.latency import machine, median_seconds

ROWS = {"prefill (2048 tokens)": 2048, "decode (batch 20)": 20}
HIDDEN, INTERMEDIATE = 1536, 8960
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gflops(rows: int, dtype: torch.dtype) -> float:
    """Rate of x (rows x hidden) times W^T (hidden x intermediate), as nn.Linear computes it."""
    x = torch.randn(rows, HIDDEN, dtype=dtype)
    weight = torch.randn(INTERMEDIATE, HIDDEN, dtype=dtype)
    seconds = median_seconds(lambda: torch.nn.functional.linear(x, weight), repeats=7)
    return 2 * rows * HIDDEN * INTERMEDIATE / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args()
    rows = []
    print(f"{machine()}, {torch.get_num_threads()} threads")
    print("| product | fp32 GFLOPS | bf16 GFLOPS | bf16 / fp32 |\n|---|---|---|---|")
    for name, count in ROWS.items():
        rates = {dtype: gflops(count, DTYPES[dtype]) for dtype in DTYPES}
        rows.append({"product": name, "rows": count, **rates})
        print(f"| {name} | {rates['fp32']:.0f} | {rates['bf16']:.0f} "
              f"| {rates['bf16'] / rates['fp32']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "threads": torch.get_num_threads(),
                                        "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
