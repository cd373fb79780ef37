"""CATS' Triton decode kernel on a GPU, timed alone against the dense products it replaces.

One decode token through one MLP of a Qwen2.5-14B-shaped model (D 5120, D_FF 13824), bf16:
- dense: the gate, up and down products, as PyTorch runs them (all three matrices read);
- CATS: the gate product, then `caprese.kernels.triton.cats_decode` reading only the up and
  down rows whose gate survives (about half at density 0.5), for several block shapes;
- read: a plain sum over the same weights, the memory's own rate (the limit).
Each row gives microseconds per layer and the GB/s of the bytes the kernel must read. The
layers cycle over enough distinct weights (4 GB) that none stays in the GPU's cache; median
of 7 synchronized runs after 2 untimed ones.

    python benchmarks/triton_cats.py --out benchmarks/results/triton_cats_h200.json

`--tiny` runs small shapes, also on the CPU through Triton's interpreter (TRITON_INTERPRET=1):
a check that the script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from caprese.bench.latency import median_seconds
from caprese.io import atomic_write_text
from caprese.kernels.cpu import machine
from caprese.kernels.triton import cats_decode

# (block_j, block_d, rows_per_program); the first is the kernel as it was before its rows were
# split over programs: one program per 64 output columns, each reading every row.
SHAPES = [(32, 64, 1 << 20), (32, 128, 256), (32, 128, 512), (32, 128, 1024), (64, 128, 512),
          (32, 256, 512), (16, 128, 256)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--tiny", action="store_true", help="small shapes: checks the script")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dim, d_ff, total = (64, 160, 0) if args.tiny else (5120, 13824, 4 * 2**30)
    generator = torch.Generator(device=device).manual_seed(0)
    layer_bytes = 3 * d_ff * dim * 2
    layers = [[torch.randn(d_ff, dim, device=device, generator=generator,
                           dtype=torch.bfloat16) for _ in range(3)]  # gate, up, down^T rows
              for _ in range(max(2, total // layer_bytes))]
    x = torch.randn(1, 1, dim, device=device, generator=generator, dtype=torch.bfloat16)
    act = F.silu(torch.randn(1, 1, d_ff, device=device, generator=generator)).bfloat16()
    tau = act.float().abs().quantile(1 - args.density).reshape(1)
    kept = int((act.float().abs() > tau).sum())
    cats_bytes = (d_ff + 2 * kept) * dim * 2
    count = len(layers)
    repeats, warmup = (1, 0) if args.tiny else (7, 2)

    def per_layer(run, bytes_read: int) -> dict:
        seconds = median_seconds(lambda: [run(*layer) for layer in layers], device.type,
                                 repeats, warmup) / count
        return {"us": seconds * 1e6, "gb_per_s": bytes_read / seconds / 1e9}

    rows = {"read": per_layer(lambda g, u, d: (g.sum(), u.sum(), d.sum()), layer_bytes),
            "dense": per_layer(lambda g, u, d: F.linear(F.silu(F.linear(x, g)) * F.linear(x, u),
                                                          d.T), layer_bytes)}
    for block_j, block_d, rows_per_program in SHAPES:
        chunk = "every row" if rows_per_program >= d_ff else f"{rows_per_program} rows"
        name = f"cats {block_j}x{block_d}, {chunk} per program"
        blocks = {"block_j": block_j, "block_d": block_d, "rows_per_program": rows_per_program}
        rows[name] = per_layer(lambda g, u, d, blocks=blocks: cats_decode(
            x, F.silu(F.linear(x, g)), tau, u, d, **blocks), cats_bytes)
    header = (f"one MLP, D {dim} x D_FF {d_ff}, bf16, batch 1, density {args.density} "
              f"({kept} of {d_ff} rows kept), {machine(device)}, torch {torch.__version__}")
    print(header)
    print("| kernel | us per layer | GB/s of its bytes | of read rate | vs dense |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['us']:.1f} | {row['gb_per_s']:.0f} | "
              f"{row['gb_per_s'] / rows['read']['gb_per_s']:.0%} | "
              f"{rows['dense']['us'] / row['us']:.2f}x |")
    if args.out:
        atomic_write_text(args.out, json.dumps({"about": header, "rows": rows}, indent=1) + "\n")
        print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
