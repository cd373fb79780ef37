"""Per-token overhead: HF `generate` against the lean decode loop, with and without kernels.

The full model, batch 1, greedy. HF generate's time per token is taken as
(time for G tokens - time for 1 token) / (G - 1), so its prefill cancels out; the lean loop
(`caprese/bench/decode.py`) times its steps directly. Runs alternate (A B C A B C ...);
medians of repeats. Writes benchmarks/results/decode_overhead.json.

    python benchmarks/decode_overhead.py --model qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from caprese.bench.decode import greedy_decode
from caprese.bench.latency import bytes_per_token, measure_bandwidth
from caprese.io import atomic_write_text
from caprese.kernels import use_decode_kernels
from caprese.models import load_model, weights_description

RESULTS = Path(__file__).resolve().parent / "results"


def generate_seconds(model, prompt: torch.Tensor, tokens: int) -> float:
    started = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                   min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "decode_overhead.json"))
    args = parser.parse_args()
    model, _ = load_model(args.model, dtype=torch.bfloat16)
    prompt = torch.randint(0, 20000, (1, args.prompt_len), generator=torch.Generator()
                           .manual_seed(0))
    times: dict[str, list[float]] = {"HF generate": [], "lean loop": [], "lean loop + kernels": []}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # repeat 0 warms up and is dropped
            one = generate_seconds(model, prompt, 1)
            many = generate_seconds(model, prompt, args.gen_len)
            lean = greedy_decode(model, prompt, args.gen_len).ttnt
            use_decode_kernels(model)
            kernels = greedy_decode(model, prompt, args.gen_len).ttnt
            use_decode_kernels(model, False)
            if repeat:
                times["HF generate"].append((many - one) / (args.gen_len - 1))
                times["lean loop"].append(lean)
                times["lean loop + kernels"].append(kernels)
    floor = bytes_per_token(model, "full", 0.5, 256, args.prompt_len + args.gen_len // 2) / \
        measure_bandwidth(torch.bfloat16)
    rows = [{"path": name, "ttnt": statistics.median(values), "runs": values,
             "floor_fraction": floor / statistics.median(values)} for name, values in times.items()]
    print(f"{args.model}, bf16, batch 1, prompt {args.prompt_len} + {args.gen_len}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; "
          f"floor {1e3 * floor:.1f} ms")
    print("| path | TTNT ms | of floor |\n|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {1e3 * row['ttnt']:.1f} | {100 * row['floor_fraction']:.0f}% |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(
        {"model": args.model, "weights": weights_description(args.model), "dtype": "bf16",
         "prompt_len": args.prompt_len, "gen_len": args.gen_len,
         "threads": torch.get_num_threads(), "floor_ttnt": floor, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
