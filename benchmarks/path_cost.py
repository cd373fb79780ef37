"""What the low-rank path costs a decode step: each method alone against Caprese on it, paired.

The path adds about 1% to the bytes a token reads, so its cost is a few percent of a step:
less than this machine's drift over a minute (a shared host's memory bandwidth wanders by
10-30%), which swamps a comparison of variants timed one after the other, as `caprese bench`
and benchmarks/compiled_decode.py do. Here two copies of the model stay loaded, one with the
method alone and one with Caprese (an untrained path of the same rank: it times as a trained
one), both with the CPU kernels on and, with --compile, compiled; runs alternate between
them every few seconds (--reattach: one model, attached afresh before every run, as
`caprese bench` does). Each round gives the ratio of the two median steps, and the table
gives the median of those ratios beside the ratio of the bytes each step reads.

--full adds a third copy, the full model (its linears on the same kernels), to the same
rounds, and reports what the method and Caprese on it cut from the full model's step, in
time and in bytes, paired the same way: the target "TTNT cut >= 80% of the byte cut" is a
ratio of two such cuts, which variants timed minutes apart cannot settle on a noisy host.

Every run is followed by a read of 512 MB (caprese.bench.latency.bandwidth_probe), and each
variant's fraction of the bandwidth floor is taken per round against the rate read right
after it: the >= 75%-of-floor target, judged at the bandwidth the steps saw. Prints tables
and writes JSON:

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
from caprese.bench.latency import bandwidth_probe, bytes_per_token
from caprese.io import atomic_write_text
from caprese.kernels.cpu import machine
from caprese.models import load_model

METHODS = ("griffin", "cats")
PATH_VARIANT = {"griffin": "caprese", "cats": "caprese-cats"}  # caprese.bench.latency's names


@contextlib.contextmanager
def attached(model, method: str | None, rank: int | None, args) -> Iterator[None]:
    """`model` as the method (with a path of `rank`), its decode layouts built, kernels on;
    method None: the full model, its linears on the kernels."""
    if method:
        caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density,
                                                    rank=rank))
        caprese.prepare_decode(model, batch=1)
    caprese.use_decode_kernels(model)
    try:
        yield
    finally:
        caprese.use_decode_kernels(model, False)
        if method:
            caprese.detach(model)


def paired_rounds(runs: dict[str, Callable[[], list[float]]], rounds: int,
                  read_rate: Callable[[], float] | None = None
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Median step seconds of each variant, per round; rounds alternate which variant goes
    first so that neither always runs right after the other's warm caches. With `read_rate`,
    also the machine's read rate measured right after each run (bytes per second)."""
    medians: dict[str, list[float]] = {name: [] for name in runs}
    rates: dict[str, list[float]] = {name: [] for name in runs} if read_rate else {}
    order = list(runs)
    for round_ in range(rounds + 1):  # round 0 compiles (or warms) and is dropped
        for name in order if round_ % 2 else order[::-1]:
            steps = runs[name]()
            if round_:
                medians[name].append(statistics.median(steps))
                if read_rate:
                    rates[name].append(read_rate())
    return medians, rates


def method_rounds(models: list, method: str, prompt: torch.Tensor, args,
                  read_rate: Callable[[], float]
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """paired_rounds of the method alone and Caprese on it (and with --full the full model):
    on a model each, attached once, or with --reattach on one model attached afresh for every
    run (as `caprese bench` does)."""
    variants = {method: (method, None), f"caprese-{method}": (method, args.rank)}
    if args.full:
        variants = {"full": (None, None), **variants}

    def decode(model) -> list[float]:
        return greedy_decode(model, prompt, args.gen_len, compile=args.compile).step_seconds

    if args.reattach:
        def afresh(as_method, rank):
            with attached(models[0], as_method, rank, args):
                return decode(models[0])
        return paired_rounds({name: functools.partial(afresh, *how)
                              for name, how in variants.items()}, args.rounds, read_rate)
    with contextlib.ExitStack() as stack:
        for model, how in zip(models, variants.values(), strict=True):
            stack.enter_context(attached(model, *how, args))
        return paired_rounds({name: functools.partial(decode, model)
                              for name, model in zip(variants, models, strict=True)},
                             args.rounds, read_rate)


def quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles of `values`."""
    first, _, third = statistics.quantiles(values, n=4)
    return [first, third]


def bytes_read(model, method: str, name: str, density: float, rank: int, context: int) -> int:
    """bytes_per_token of this script's variant `name` (full, the method, caprese-method)."""
    latency_name = {method: method, f"caprese-{method}": PATH_VARIANT[method]}.get(name, name)
    return bytes_per_token(model, latency_name, density, rank, context)


def full_cuts(model, method: str, medians: dict[str, list[float]], density: float, rank: int,
              context: int) -> dict[str, dict[str, float]]:
    """What each variant cuts from the full model's step: in time (one minus the median over
    rounds of the paired ratio), in bytes read, and the first as a fraction of the second."""
    full_bytes = bytes_read(model, method, "full", density, rank, context)
    cuts = {}
    for name, steps in medians.items():
        if name == "full":
            continue
        time_cut = 1 - statistics.median(s / f for s, f in zip(steps, medians["full"],
                                                                strict=True))
        bytes_cut = 1 - bytes_read(model, method, name, density, rank, context) / full_bytes
        cuts[name] = {"time_cut": time_cut, "bytes_cut": bytes_cut,
                      "cut_fraction": time_cut / bytes_cut}
    return cuts


def floor_fractions(model, method: str, medians: dict[str, list[float]],
                    rates: dict[str, list[float]], density: float, rank: int, context: int
                    ) -> dict[str, dict[str, float | list[float]]]:
    """Each variant's step against the time its bytes take at the read rate measured right
    after it, per round: the fraction of the floor, paired with the bandwidth the step saw
    (a rate measured minutes away can be off by a third on a shared host). Medians over
    rounds, with quartiles."""
    fractions = {}
    for name, steps in medians.items():
        read = bytes_read(model, method, name, density, rank, context)
        per_round = [read / rate / step for step, rate in zip(steps, rates[name], strict=True)]
        fractions[name] = {"of_floor": statistics.median(per_round),
                           "of_floor_quartiles": quartiles(per_round),
                           "read_gb_s": statistics.median(rates[name]) / 1e9}
    return fractions


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
    parser.add_argument("--full", action="store_true",
                        help="also time the full model in the same rounds and report each "
                        "variant's cut from it, in time and in bytes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if not set(methods) <= set(METHODS):
        parser.error(f"--methods takes {', '.join(METHODS)}, got {args.methods!r}")
    torch.set_num_threads(args.threads)
    copies = 1 if args.reattach else 2 + args.full
    models = [load_model(args.model, dtype=args.dtype)[0] for _ in range(copies)]
    prompt = torch.randint(0, models[0].config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0))
    context = args.prompt_len + args.gen_len
    probe = bandwidth_probe(next(models[0].parameters()).dtype)
    rows = []
    for method in methods:
        torch._dynamo.reset()
        medians, rates = method_rounds(models, method, prompt, args,
                                       functools.partial(probe, repeats=7, warmup=1))
        ratios = [b / a for a, b in zip(medians[method], medians[f"caprese-{method}"],
                                        strict=True)]
        read = [bytes_read(models[0], method, name, args.density, args.rank, context)
                for name in (method, f"caprese-{method}")]
        rows.append({"method": method, "alone_ms": 1e3 * statistics.median(medians[method]),
                     "caprese_ms": 1e3 * statistics.median(medians[f"caprese-{method}"]),
                     "time_ratio": statistics.median(ratios),
                     "time_ratio_quartiles": quartiles(ratios), "bytes_ratio": read[1] / read[0],
                     "round_ratios": ratios, "round_medians_ms": {
                         name: [1e3 * s for s in values] for name, values in medians.items()},
                     "floor": floor_fractions(models[0], method, medians, rates, args.density,
                                              args.rank, context)})
        if args.full:
            rows[-1]["full_ms"] = 1e3 * statistics.median(medians["full"])
            rows[-1]["cuts"] = full_cuts(models[0], method, medians, args.density, args.rank,
                                         context)
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
    print("| rounds of | variant | TTNT ms | read GB/s, right after | of floor (quartiles) |\n"
          "|---|---|---|---|---|")
    for row in rows:
        for name, floor in row["floor"].items():
            low, high = floor["of_floor_quartiles"]
            ms = statistics.median(row["round_medians_ms"][name])
            print(f"| {row['method']} | {name} | {ms:.1f} | {floor['read_gb_s']:.1f} | "
                  f"{floor['of_floor']:.0%} ({low:.0%}-{high:.0%}) |")
    print("(the fraction of the floor per round: the step's bytes at the read rate measured "
          "right after its run, over the step's time)")
    if args.full:
        print("| variant | full TTNT ms | time cut | bytes cut | time cut / bytes cut |\n"
              "|---|---|---|---|---|")
        for row in rows:
            for name, cut in row["cuts"].items():
                print(f"| {name} | {row['full_ms']:.1f} | {cut['time_cut']:.1%} | "
                      f"{cut['bytes_cut']:.1%} | {cut['cut_fraction']:.2f} |")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"setup": setup, "methods": rows},
                                                     indent=2))


if __name__ == "__main__":
    main()
