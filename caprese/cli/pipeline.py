"""`caprese pipeline`: the main job (scripts/main.sh runs it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from caprese.cli.common import command_line
from caprese.dtypes import DTYPE_CHOICES
from caprese.pipeline import preset_for, preset_name, run_pipeline


def run(args: argparse.Namespace) -> int:
    name = preset_name(args.quick, args.dtype, args.device)
    print(f"[pipeline] preset {name}", flush=True)
    run_pipeline(preset_for(args.quick, args.model, args.dtype, args.device), Path(args.out),
                 device=args.device, dtype=args.dtype, command=command_line(args))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="the main job: distill, evaluate, report")
    p.add_argument("--out", default="caprese-run")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of every step; without it the sizes depend on the dtype: "
                   "'default' on GPUs and on CPUs with AMX (bf16), smaller 'compact' on "
                   "other CPUs")
    p.add_argument("--model", help="override the preset's model (built-in name, folder, Hub id)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="of every step; auto: bf16 on GPUs and on CPUs with AVX512_BF16 or "
                   "AMX, fp32 on other CPUs (where bf16 runs in software, several times slower)")
    p.set_defaults(func=run)
