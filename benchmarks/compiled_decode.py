"""Compiled against eager decode steps on the CPU, both with caprese's kernels, interleaved.

`caprese bench --compile` and a plain `caprese bench` are two runs, minutes apart, on a noisy
machine. Here each variant is attached once, with the CPU kernels on (`:k`), and rounds
alternate an eager and a compiled greedy run of the same prompt; the first round (which
compiles) is dropped and each column is the median over the other rounds' steps. With
--cycles N the whole list of variants is run N times over, so that each variant is timed at
N moments apart: a machine that slows for a while then slows every variant, not one
(Caprese's path against its method alone is a few percent, less than that drift). Prints a
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
from caprese.io import atomic_write_text
from caprese.kernels.cpu import machine
from caprese.models import load_model

# name: (method, whether an untrained low-rank path rides along: it times as a trained one)
VARIANTS = {"full": (None, False), "griffin": ("griffin", False), "caprese": ("griffin", True),
            "cats": ("cats", False), "caprese-cats": ("cats", True)}
MODES = ("eager", "inductor")


def time_variant(model, prompt, method: str | None, path: bool, args) -> dict:
    """Eager and compiled decode steps (seconds) of one variant, attached once, kernels on."""
    torch._dynamo.reset()  # one compiled graph at a time: no guard search across variants
    if method:
        caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density,
                                                    rank=args.rank if path else None))
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
    return {**steps, "same_tokens": bool(torch.equal(tokens["eager"], tokens["inductor"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=17)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--rank", type=int, default=256, help="the low-rank path's r")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0))
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if len(set(names)) < len(names):
        parser.error("name each variant once (--cycles repeats them all)")
    steps = {name: {mode: [] for mode in MODES} for name in names}
    cycle_ms = {name: {mode: [] for mode in MODES} for name in names}
    same = {name: True for name in names}
    for _ in range(args.cycles):
        for name in names:
            timed = time_variant(model, prompt, *VARIANTS[name], args)
            for mode in MODES:
                steps[name][mode].extend(timed[mode])
                cycle_ms[name][mode].append(1e3 * statistics.median(timed[mode]))
            same[name] &= timed["same_tokens"]
    rows = []
    for name in names:
        eager, compiled = (statistics.median(steps[name][mode]) for mode in MODES)
        rows.append({"variant": f"{name}:k", "eager_ms": 1e3 * eager,
                     "compiled_ms": 1e3 * compiled, "ratio": compiled / eager,
                     "same_tokens": same[name], "cycle_medians_ms": cycle_ms[name],
                     "steps": steps[name]})
        method = {"caprese": "griffin", "caprese-cats": "cats"}.get(name)
        if method in names:  # paired by cycle: a minute or two apart, not a whole cycle
            pairs = zip(cycle_ms[name]["inductor"], cycle_ms[method]["inductor"],
                        strict=True)
            rows[-1]["compiled_vs_method"] = statistics.median(a / b for a, b in pairs)
    setup = {"model": args.model, "dtype": str(next(model.parameters()).dtype),
             "prompt_len": args.prompt_len, "gen_len": args.gen_len, "rounds": args.rounds - 1,
             "cycles": args.cycles, "density": args.density, "rank": args.rank,
             "threads": args.threads, "batch": 1, "machine": machine()}
    count = len(rows[0]["steps"]["eager"])
    print(f"{setup}\n| variant | eager TTNT ms | compiled TTNT ms | compiled / eager | "
          f"compiled, each cycle | compiled / its method | same tokens |\n"
          f"|---|---|---|---|---|---|---|")
    for row in rows:
        each = ", ".join(f"{ms:.1f}" for ms in row["cycle_medians_ms"]["inductor"])
        against = row.get("compiled_vs_method")
        print(f"| {row['variant']} | {row['eager_ms']:.1f} | {row['compiled_ms']:.1f} | "
              f"{row['ratio']:.3f} | {each} | {'-' if against is None else f'{against:.3f}'} "
              f"| {row['same_tokens']} |")
    print(f"(medians of {count} steps each; against its method: the median over cycles of "
          "the ratio of the two variants' compiled medians)")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"setup": setup, "variants": rows}, indent=2))


if __name__ == "__main__":
    main()
