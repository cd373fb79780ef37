"""Issue-6 evidence on the CPU: decode latency of every variant, bf16 and fp32.

Runs `caprese bench` for each dtype (variants interleaved, medians of repeats) and writes
benchmarks/results/decode_latency_cpu.json; prints one table per dtype.

    python benchmarks/decode_latency.py --model qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from caprese.bench.latency import VARIANTS, format_table, run_bench
from caprese.io import atomic_write_text
from caprese.models import load_model, weights_description

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "decode_latency_cpu.json"))
    args = parser.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    results = {"model": args.model, "weights": weights_description(args.model), "runs": {}}
    for name in args.dtypes.split(","):
        model, _ = load_model(args.model, dtype=dtypes[name])
        result = run_bench(model, args.variants.split(","), args.prompt_len, args.gen_len,
                           args.repeats, rank=args.rank)
        results["runs"][name] = result
        print(f"\n## {args.model}, {name}\n{format_table(result)}", flush=True)
        del model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
