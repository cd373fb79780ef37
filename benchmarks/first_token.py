"""Time to first token as a server sees it: each variant attached once, several prompts.

`caprese bench` attaches every variant afresh for each repeat, so its TTFT column is a first
prompt's. Here each variant is attached once per round (its once-per-attach work done by
prepare_decode, untimed) and then answers several different prompts; rounds alternate the
variants and the first round is dropped. Prints a table and writes JSON:

    python benchmarks/first_token.py --model qwen2.5-coder-1.5b-instruct --prompt-len 256 \\
        --out benchmarks/results/first_token_icelake_fp32.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import caprese
from caprese.bench.decode import greedy_decode
from caprese.io import atomic_write_text
from caprese.kernels.cpu import machine
from caprese.models import load_model

VARIANTS = {"full": None, "griffin": "griffin", "cats": "cats"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (1, args.prompt_len), generator=generator)
               for _ in range(args.prompts)]
    ttft: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):  # round 0 warms up and is dropped
        for name, method in VARIANTS.items():
            if method:
                caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density))
                caprese.prepare_decode(model, batch=1)
            for prompt in prompts:
                seconds = greedy_decode(model, prompt, 2).ttft
                if round_:
                    ttft[name].append(seconds)
            if method:
                caprese.detach(model)
    full = statistics.median(ttft["full"])
    rows = [{"variant": name, "ttft": statistics.median(times), "added": statistics.median(times)
             / full - 1, "runs": times} for name, times in ttft.items()]
    setup = {"model": args.model, "dtype": str(next(model.parameters()).dtype),
             "prompt_len": args.prompt_len, "prompts": args.prompts, "rounds": args.rounds - 1,
             "density": args.density, "threads": args.threads, "machine": machine()}
    print(f"{setup}\n| variant | TTFT s (median of {len(ttft['full'])}) | added |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['ttft']:.3f} | {100 * row['added']:+.1f}% |")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"setup": setup, "variants": rows}, indent=2))


if __name__ == "__main__":
    main()
