"""What the low-rank path costs a decode step: each method alone against Caprese on it, paired.

The path adds about 1% to the bytes a token reads, so its cost is a few percent of a step:
less than this machine's drift over a minute (a shared host's memory bandwidth wanders by
10-30%), which swamps a comparison of variants timed one after the other, as `caprese bench`
and benchmarks/compiled_decode.py do. Here two copies of the model stay loaded, one with the
method alone and one with Caprese (an untrained path of the same rank: it times as a trained
one), both with the CPU kernels on and, with --compile, compiled; runs alternate between
them every few seconds (--reattach: one model, attached afresh before every run, as
`caprese bench` does). Each round gives the ratio of the two median steps, and the table
gives the median of those ratios beside the ratio of the bytes each step reads. Prints a
table and writes JSON:

    python benchmarks/path_cost.py --model qwen2.5-coder-1.5b-instruct --dtype bf16 --compile \\
        --out benchmarks/results/path_cost_xeon_bf16.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch._dynamo

import caprese
from caprese.bench.decode import greedy_decode
from caprese.bench.latency import bytes_per_token, machine
from caprese.io import atomic_write_text
from caprese.models import load_model

METHODS = ("griffin", "cats")
PATH_VARIANT = {"griffin": "caprese", "cats": "caprese-cats"}  # caprese.bench.latency's names


@contextlib.contextmanager
def attached(model, method: str, rank: int | None, args) -> Iterator[None]:
    """`model` as the method (with a path of `rank`), its decode layouts built, kernels on."""
    caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density, rank=rank))
    caprese.prepare_decode(model, batch=1)
    caprese.use_decode_kernels(model)
    try:
        yield
    finally:
        caprese.use_decode_kernels(model, False)
        caprese.detach(model)


def paired_rounds(runs: dict[str, Callable[[], list[float]]], rounds: int
                  ) -> dict[str, list[float]]:
    """Median step seconds of each variant, per round; rounds alternate which variant goes
    first so that neither always runs right after the other's warm caches."""
    medians: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_ in range(rounds + 1):  # round 0 compiles (or warms) and is dropped
        for name in order if round_ % 2 else order[::-1]:
            steps = runs[name]()
            if round_:
                medians[name].append(statistics.median(steps))
    return medians


def method_rounds(models: list, method: str, prompt: torch.Tensor, args
                  ) -> dict[str, list[float]]:
    """paired_rounds of the method alone and Caprese on it: on two models attached once, or
    with --reattach on one model attached afresh for every run (as `caprese bench` does)."""
    variants = {method: None, f"caprese-{method}": args.rank}

    def decode(model) -> list[float]:
        return greedy_decode(model, prompt, args.gen_len, compile=args.compile).step_seconds

    if args.reattach:
        def afresh(rank):
            with attached(models[0], method, rank, args):
                return decode(models[0])
        return paired_rounds({name: functools.partial(afresh, rank)
                              for name, rank in variants.items()}, args.rounds)
    with contextlib.ExitStack() as stack:
        for model, rank in zip(models, variants.values(), strict=True):
            stack.enter_context(attached(model, method, rank, args))
        return paired_rounds({name: functools.partial(decode, model)
                              for name, model in zip(variants, models, strict=True)},
                             args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--rank", type=int, default=256, help="the low-rank path's r")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=17)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--compile", nargs="?", const="inductor",
                        help="decode steps compiled with this torch.compile backend")
    parser.add_argument("--reattach", action="store_true",
                        help="one model, attached afresh for every run (as `caprese bench` "
                        "does), instead of two models attached once")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if not set(methods) <= set(METHODS):
        parser.error(f"--methods takes {', '.join(METHODS)}, got {args.methods!r}")
    torch.set_num_threads(args.threads)
    models = [load_model(args.model, dtype=args.dtype)[0] for _ in range(1 + (not args.reattach))]
    prompt = torch.randint(0, models[0].config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0))
    context = args.prompt_len + args.gen_len
    rows = []
    for method in methods:
        torch._dynamo.reset()
        medians = method_rounds(models, method, prompt, args)
        ratios = [b / a for a, b in zip(*medians.values(), strict=True)]
        read = [bytes_per_token(models[0], name, args.density, args.rank, context)
                for name in (method, PATH_VARIANT[method])]
        quartiles = statistics.quantiles(ratios, n=4)
        rows.append({"method": method, "alone_ms": 1e3 * statistics.median(medians[method]),
                     "caprese_ms": 1e3 * statistics.median(medians[f"caprese-{method}"]),
                     "time_ratio": statistics.median(ratios), "time_ratio_quartiles":
                     [quartiles[0], quartiles[2]], "bytes_ratio": read[1] / read[0],
                     "round_ratios": ratios, "round_medians_ms": {
                         name: [1e3 * s for s in values] for name, values in medians.items()}})
    setup = {"model": args.model, "dtype": str(next(models[0].parameters()).dtype),
             "compile": args.compile, "reattach": args.reattach,
             "prompt_len": args.prompt_len, "gen_len": args.gen_len,
             "rounds": args.rounds, "density": args.density, "rank": args.rank,
             "threads": args.threads, "batch": 1, "machine": machine()}
    print(f"{setup}\n| method | alone TTNT ms | Caprese TTNT ms | Caprese / alone, time "
          "(quartiles) | Caprese / alone, bytes |\n|---|---|---|---|---|")
    for row in rows:
        low, high = row["time_ratio_quartiles"]
        print(f"| {row['method']} | {row['alone_ms']:.1f} | {row['caprese_ms']:.1f} | "
              f"{row['time_ratio']:.3f} ({low:.3f}-{high:.3f}) | {row['bytes_ratio']:.3f} |")
    print(f"(medians over {args.rounds} rounds of the ratio of the two variants' median steps)")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"setup": setup, "methods": rows},
                                                     indent=2))


if __name__ == "__main__":
    main()
