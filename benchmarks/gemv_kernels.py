"""One decode token's matrix-vector products in bf16 (or fp32), timed alone: PyTorch, caprese's CPU
kernel, and a plain read of the same bytes (the limit), in GB/s; CATS' sparse decode,
counted in the bytes of the rows it keeps, also against a plain read of just those scattered
rows (its own limit); and a decode token's attention after a 2048-token prompt
(decode_attention), counted in the bytes of the keys and values it reads.

The shapes are qwen2.5-coder-1.5b's: gate/up (8960 x 1536), down (1536 x 8960) and the LM
head (151936 x 1536), and the down projection as rows the way GRIFFIN's gathered matrices
store it at density 0.5 with the low-rank path's r = 256 rows appended (4736 x 1536,
`rows_product`). Each shape is timed over enough distinct random matrices (600 MB) that
none stays in the caches; median of 9 after 2 untimed runs.

    python benchmarks/gemv_kernels.py --out benchmarks/results/gemv_kernels_<cpu>.json

`--dtype fp32` times the fp32 kernels instead (the ones CPUs not made by Intel decode with,
`caprese.kernels.cpu.FP32_KERNELS`; the matrices then hold half as many values per MB).

`--against REV` also builds the kernel source of git revision REV (under an operator
namespace of its own) and times it against the working tree's, the two alternating run by run
on the same matrices, so that a kernel change is measured side by side.

The matrices lie on 2 MiB pages, as a model's weights do under the decode kernels
(caprese/kernels/huge_pages.py); `--pages` also times the kernel and the read on copies kept
on 4 KiB pages, side by side:

    python benchmarks/gemv_kernels.py --pages --out benchmarks/results/huge_pages_<cpu>.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from caprese.bench.latency import median_seconds
from caprese.io import atomic_write_text
from caprese.kernels import cpu
from caprese.kernels.cpu import machine
from caprese.kernels.huge_pages import collapse, keep_off

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHAPES = {"gate/up": (8960, 1536), "down": (1536, 8960), "lm head": (151936, 1536)}


def read_rate(tensors: list[torch.Tensor]) -> float:
    """Bytes per second of a plain read (a sum) of `tensors`: the limit."""
    flat = [t.view(-1).view(torch.float32) for t in tensors]
    return sum(t.numel() * t.element_size() for t in tensors) / median_seconds(
        lambda: [f.sum() for f in flat])


# A plain read of the rows index[...] of w: threads split the list, each reads its rows front
# to back (the order CATS' kernel reads its kept rows in).
READ_ROWS_SOURCE = """
#include <torch/extension.h>
#include <ATen/Parallel.h>
int64_t read_rows(torch::Tensor w, torch::Tensor index) {
  const int64_t words = w.size(1) * w.element_size() / 8;
  TORCH_CHECK(w.is_contiguous() && words % 8 == 0, "rows must be whole 64-byte lines");
  const auto* base = static_cast<const uint64_t*>(w.data_ptr());
  const int64_t* rows = index.data_ptr<int64_t>();
  std::vector<uint64_t> seen(at::get_num_threads(), 0);
  at::parallel_for(0, index.numel(), 64, [&](int64_t first, int64_t last) {
    uint64_t line[8] = {};  // eight independent words per step: one 64-byte line
    for (int64_t j = first; j < last; ++j) {
      const uint64_t* row = base + rows[j] * words;
      for (int64_t k = 0; k < words; k += 8)
        for (int i = 0; i < 8; ++i) line[i] ^= row[k + i];
    }
    for (int i = 0; i < 8; ++i) seen[at::get_thread_num()] ^= line[i];
  });
  uint64_t all = 0;
  for (uint64_t v : seen) all ^= v;
  return int64_t(all);
}
"""


def read_rows_rate(matrices: list[torch.Tensor], index: torch.Tensor) -> float:
    """Bytes per second of a plain read of rows `index` of each of `matrices`."""
    module = load_inline("caprese_bench_read_rows", cpp_sources=READ_ROWS_SOURCE,
                         functions=["read_rows"], **cpu.BUILD_FLAGS)
    total = sum(index.numel() * m.shape[1] * m.element_size() for m in matrices)
    return total / median_seconds(lambda: [module.read_rows(m, index) for m in matrices])


def on_small_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` on 4 KiB pages."""
    return [keep_off(torch.empty_like(t)).copy_(t) for t in tensors]


def kernels_at(revision: str):
    """torch.ops namespace of caprese's CPU kernels as they were at git `revision`."""
    folder = cpu.SOURCE.parent.relative_to(Path.cwd())
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{revision}:{folder}"],
                           capture_output=True, text=True, check=True).stdout.split()
    files = {name: subprocess.run(["git", "show", f"{revision}:{folder / name}"],
                                  capture_output=True, text=True, check=True).stdout
             for name in names if name.endswith((".cpp", ".h"))}
    return cpu.build_variant(files, "caprese_at_" + re.sub(r"\W", "_", revision))


def alternating_medians(runs: dict, repeats: int = 9, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each run, the runs taking turns, so that drift hits all alike; the
    order reverses every turn, since a run right after another finds different caches (the
    same kernel timed twice in a fixed order came out 2-5% apart)."""
    times = {name: [] for name in runs}
    order = list(runs.items())
    for turn in range(warmup + repeats):
        for name, run in order if turn % 2 else order[::-1]:
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(spans[warmup:]) for name, spans in times.items()}


def gigabytes_per_second(weights: list[torch.Tensor], ours, theirs, old=None,
                         revision: str = "", pages: bool = False) -> dict[str, float]:
    """Rates of ours(w) (caprese's kernel), theirs(w) (PyTorch) and old(w) (the kernel of
    `revision`, if given) over all `weights`, alternating, and of a plain read of them."""
    total = sum(w.numel() * w.element_size() for w in weights)
    runs = {"pytorch": lambda: [theirs(w) for w in weights],
            "caprese": lambda: [ours(w) for w in weights]}
    small = on_small_pages(weights) if pages else []
    if pages:
        runs["caprese, 4 KiB pages"] = lambda: [ours(w) for w in small]
    if old is not None:
        runs[f"caprese at {revision}"] = lambda: [old(w) for w in weights]
    seconds = alternating_medians(runs)
    return {"read": read_rate(weights) / 1e9,
            **({"read, 4 KiB pages": read_rate(small) / 1e9} if pages else {}),
            **{name: total / spent / 1e9 for name, spent in seconds.items()}}


def random_weights(megabytes: int, shape: tuple[int, int], dtype: torch.dtype
                   ) -> list[torch.Tensor]:
    """Enough distinct matrices of `shape` that none stays in the caches, on huge pages."""
    count = max(1, megabytes * 2**20 // (shape[0] * shape[1] * dtype.itemsize))
    weights = [torch.randn(shape).to(dtype) for _ in range(count)]
    collapse(weights)
    return weights


def linear_rows(megabytes: int, name: str, shape: tuple[int, int], dtype: torch.dtype,
                against=None, revision: str = "", pages: bool = False) -> dict:
    """y = x W^T, W (out, in)."""
    weights = random_weights(megabytes, shape, dtype)
    x = torch.randn(1, shape[1]).to(dtype)
    old = None
    if against is not None:  # the same work as cpu.linear, rounding the output
        row = x.reshape(1, -1)
        try:  # x as it is, where that revision's kernel takes a bf16 x
            against.linear(row, weights[0])
        except RuntimeError:
            row = row.float()

        def old(w):
            return against.linear(row, w).to(x.dtype)
    return {"matrix": name, "shape": list(shape), "matrices": len(weights),
            **gigabytes_per_second(weights, lambda w: cpu.linear(x, w, None),
                                   lambda w: torch.nn.functional.linear(x, w), old, revision,
                                   pages)}


def down_rows(megabytes: int, dtype: torch.dtype, against=None, revision: str = "",
              pages: bool = False) -> dict:
    """y = h M for M stored as rows (GRIFFIN's gathered W2^T with R below it)."""
    shape = (4480 + 256, SHAPES["down"][0])
    weights = random_weights(megabytes, shape, dtype)
    h = torch.randn(1, shape[0]).to(dtype)
    flat = h.reshape(-1).float()
    old = None if against is None else (
        lambda w: against.rows_product(flat, w).to(h.dtype))  # as cpu.rows_product does
    return {"matrix": "down as rows", "shape": list(shape), "matrices": len(weights),
            **gigabytes_per_second(weights, lambda w: cpu.rows_product(h, w, None),
                                   lambda w: h @ w, old, revision, pages)}


def cats_rows(megabytes: int, dtype: torch.dtype, against=None, revision: str = "",
              pages: bool = False) -> dict:
    """CATS' sparse decode of one MLP's up and down rows (gate values drawn so that about
    half the rows survive), against a read of the same count of bytes."""
    d_ff, dim = SHAPES["gate/up"]
    count = max(1, megabytes * 2**20 // (2 * d_ff * dim * dtype.itemsize))
    layers = [(torch.randn(d_ff, dim).to(dtype), torch.randn(d_ff, dim).to(dtype))
              for _ in range(count)]
    collapse(t for pair in layers for t in pair)
    x = torch.randn(1, 1, dim).to(dtype)
    act = torch.randn(1, 1, d_ff).to(dtype)
    tau = act.float().abs().median()
    kept = torch.nonzero(act.reshape(-1).float().abs() > tau).reshape(-1)
    kept_bytes = count * 2 * kept.numel() * dim * dtype.itemsize
    runs = {"caprese": lambda: [cpu.cats_decode(x, act, tau, up, down) for up, down in layers]}
    small = [on_small_pages(pair) for pair in layers] if pages else []
    if pages:
        runs["caprese, 4 KiB pages"] = lambda: [cpu.cats_decode(x, act, tau, up, down)
                                                for up, down in small]
    if against is not None:  # the same work as cpu.cats_decode
        flat_act, flat_x = act.reshape(-1).float(), x.reshape(-1)
        try:  # x as it is, where that revision's kernel takes a bf16 x
            against.cats_decode(flat_act, tau, *layers[0], flat_x)
        except RuntimeError:
            flat_x = flat_x.float()
        runs[f"caprese at {revision}"] = lambda: [
            against.cats_decode(flat_act, tau, up, down, flat_x).to(x.dtype)
            for up, down in layers]
    seconds = alternating_medians(runs)
    return {"matrix": "CATS up + down, kept rows", "shape": [d_ff, dim], "matrices": 2 * count,
            "read": read_rate([up for up, _ in layers]) / 1e9, "pytorch": None,
            "read, kept rows": read_rows_rate([t for pair in layers for t in pair], kept) / 1e9,
            **({"read, 4 KiB pages": read_rate([up for up, _ in small]) / 1e9} if pages else {}),
            **{name: kept_bytes / spent / 1e9 for name, spent in seconds.items()}}


def attention_rows(megabytes: int, dtype: torch.dtype, against=None, revision: str = "",
                   pages: bool = False) -> dict:
    """One decode token's attention (decode_attention) after a 2048-token prompt: the 1.5B
    model's 12 query heads on 2 KV heads of 128 in a static cache of 2304 positions whose
    last 255 the mask closes; in GB/s of the open keys and values it reads."""
    heads, kv_heads, dim, positions, open_positions = 12, 2, 128, 2304, 2049
    shape = (1, kv_heads, positions, dim)
    count = max(1, megabytes * 2**20 // (2 * positions * kv_heads * dim * dtype.itemsize))
    layers = [(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype))
              for _ in range(count)]
    collapse(t for pair in layers for t in pair)
    query = torch.randn(1, heads, 1, dim).to(dtype)
    mask = torch.zeros(1, positions)
    mask[:, open_positions:] = torch.finfo(dtype).min
    open_bytes = count * 2 * kv_heads * open_positions * dim * dtype.itemsize
    runs = {"caprese": lambda: [torch.ops.caprese.decode_attention(query, k, v, mask, dim**-0.5)
                                for k, v in layers]}
    if against is not None:
        runs[f"caprese at {revision}"] = lambda: [
            against.decode_attention(query, k, v, mask, dim**-0.5) for k, v in layers]
    seconds = alternating_medians(runs)
    return {"matrix": "decode attention, open keys + values",
            "shape": [kv_heads * positions, dim],
            "matrices": 2 * count, "read": read_rate([k for k, _ in layers]) / 1e9,
            "pytorch": None, **{name: open_bytes / spent / 1e9 for name, spent in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=600)
    parser.add_argument("--against", metavar="REV",
                        help="also time the kernels of this git revision, side by side")
    parser.add_argument("--pages", action="store_true",
                        help="also time the kernels and the read on copies on 4 KiB pages")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    if cpu.module() is None:
        raise SystemExit("caprese's CPU kernels did not build on this machine")
    if dtype == torch.float32 and not cpu.FP32_KERNELS:
        raise SystemExit("fp32 products stay with PyTorch (MKL) on this CPU: nothing to time")
    against = kernels_at(args.against) if args.against else None
    revision = args.against or ""
    rows = [linear_rows(args.megabytes, name, shape, dtype, against, revision, args.pages)
            for name, shape in SHAPES.items()]
    rows.append(down_rows(args.megabytes, dtype, against, revision, args.pages))
    rows.append(cats_rows(args.megabytes, dtype, against, revision, args.pages))
    rows.append(attention_rows(args.megabytes, dtype, against, revision))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"{args.dtype}, one token, {torch.get_num_threads()} threads, {machine()}, "
          f"commit {commit}")
    old = f"caprese at {args.against}"
    extra = f" {args.against} GB/s | {args.against} / caprese time |" if against else ""
    small = " read, 4 KiB pages | caprese, 4 KiB pages | huge / 4 KiB, read | huge / 4 KiB, " \
        "caprese |" if args.pages else ""
    print("| matrix | shape | read GB/s | PyTorch GB/s | caprese GB/s | caprese / read |" + extra
          + small)
    print("|---|---|---|---|---|---|" + ("---|---|" if against else "")
          + ("---|---|---|---|" if args.pages else ""))
    for r in rows:
        pytorch = "-" if r["pytorch"] is None else f"{r['pytorch']:.1f}"
        line = (f"| {r['matrix']} | {r['shape'][0]} x {r['shape'][1]} | {r['read']:.1f} | "
                f"{pytorch} | {r['caprese']:.1f} | {r['caprese'] / r['read']:.0%} |")
        if against:
            line += f" {r[old]:.1f} | {r['caprese'] / r[old]:.3f} |"
        if args.pages and "caprese, 4 KiB pages" in r:
            read, kernel = r["read, 4 KiB pages"], r["caprese, 4 KiB pages"]
            line += (f" {read:.1f} | {kernel:.1f} | {r['read'] / read:.3f} | "
                     f"{r['caprese'] / kernel:.3f} |")
        print(line)
    cats = next(r for r in rows if "read, kept rows" in r)
    print(f"A plain read of CATS' kept rows alone: {cats['read, kept rows']:.1f} GB/s; "
          f"caprese's kernel {cats['caprese'] / cats['read, kept rows']:.0%} of it.")
    if args.out:
        command = f"python benchmarks/gemv_kernels.py --dtype {args.dtype}" + (
            f" --against {args.against}" if against else "") + (" --pages" if args.pages else "")
        atomic_write_text(Path(args.out), json.dumps(
            {"machine": machine(), "dtype": args.dtype, "threads": torch.get_num_threads(),
             "commit": commit, "command": command, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
