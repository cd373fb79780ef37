"""`caprese bench`: decode latency of full / method / Caprese / LoRA, side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caprese.bench.latency import KERNELS, VARIANTS, format_table, parse_variant, run_bench
from caprese.cli.common import add_model_options, count, fraction, load_for
from caprese.io import atomic_write_text, json_object_with, refuse_foreign


def run(args: argparse.Namespace) -> int:
    variants = args.variants.split(",")
    for name in variants:
        parse_variant(name)
    if args.out:
        refuse_foreign(Path(args.out), json_object_with(Path(args.out), ("setup", "variants")),
                       "a caprese bench result")
    model, _, setup = load_for(args)
    result = run_bench(model, variants, args.prompt_len, args.gen_len, args.repeats,
                       args.batch, args.density, args.rank, args.adapter)
    result["setup"].update(model=args.model, dtype_reason=setup["dtype_reason"],
                           command=setup["command"])
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="decode latency: full / method / Caprese / LoRA",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--adapter", help="Caprese adapter to time (default: an untrained path)")
    p.add_argument("--variants", default="full,griffin,caprese,lora,cats",
                   help=f"comma list of {', '.join(VARIANTS)}; append {KERNELS} to decode "
                   "single tokens with caprese's CPU kernels (e.g. full:k,griffin:k)")
    p.add_argument("--density", type=fraction, default=0.5)
    p.add_argument("--rank", type=count(1), default=256)
    p.add_argument("--prompt-len", type=count(1), default=256)
    p.add_argument("--gen-len", type=count(2), default=64)
    p.add_argument("--batch", type=count(1), default=1)
    p.add_argument("--repeats", type=count(1), default=3)
    p.add_argument("--out", help="write the results JSON here")
    p.set_defaults(func=run)
