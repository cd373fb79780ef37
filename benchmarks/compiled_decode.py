"""Compiled against eager decode steps on the CPU, both with caprese's kernels, interleaved.

`caprese bench --compile` and a plain `caprese bench` are two runs, minutes apart, on a noisy
machine. Here each variant is attached once, with the CPU kernels on (`:k`), and rounds
alternate an eager and a compiled greedy run of the same prompt; the first round (which
compiles) is dropped and each column is the median over the other rounds' steps. Prints a
table and writes JSON:

    python benchmarks/compiled_decode.py --model qwen2.5-coder-1.5b-instruct --dtype bf16 \\
        --out benchmarks/results/compiled_decode_xeon_bf16.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch._dynamo

import caprese
from caprese.bench.decode import greedy_decode
from caprese.bench.latency import machine
from caprese.io import atomic_write_text
from caprese.models import load_model

VARIANTS = {"full": None, "griffin": "griffin", "cats": "cats"}
MODES = ("eager", "inductor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=17)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0))
    rows = []
    for name, method in VARIANTS.items():
        torch._dynamo.reset()  # one compiled graph at a time: no guard search across variants
        if method:
            caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density))
            caprese.prepare_decode(model, batch=1)
        caprese.use_decode_kernels(model)
        steps: dict[str, list[float]] = {mode: [] for mode in MODES}
        tokens = {}
        for round_ in range(args.rounds):  # round 0 compiles and is dropped
            for mode in MODES:
                run = greedy_decode(model, prompt, args.gen_len,
                                    compile=None if mode == "eager" else mode)
                tokens[mode] = run.tokens
                if round_:
                    steps[mode].extend(run.step_seconds)
        caprese.use_decode_kernels(model, False)
        if method:
            caprese.detach(model)
        eager, compiled = (statistics.median(steps[mode]) for mode in MODES)
        rows.append({"variant": f"{name}:k", "eager_ms": 1e3 * eager,
                     "compiled_ms": 1e3 * compiled, "ratio": compiled / eager,
                     "same_tokens": bool(torch.equal(tokens["eager"], tokens["inductor"])),
                     "steps": steps})
    setup = {"model": args.model, "dtype": str(next(model.parameters()).dtype),
             "prompt_len": args.prompt_len, "gen_len": args.gen_len, "rounds": args.rounds - 1,
             "density": args.density, "threads": args.threads, "batch": 1, "machine": machine()}
    count = len(rows[0]["steps"]["eager"])
    print(f"{setup}\n| variant | eager TTNT ms | compiled TTNT ms | compiled / eager | "
          f"same tokens |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['eager_ms']:.1f} | {row['compiled_ms']:.1f} | "
              f"{row['ratio']:.3f} | {row['same_tokens']} |")
    print(f"(medians of {count} steps each)")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"setup": setup, "variants": rows}, indent=2))


if __name__ == "__main__":
    main()
