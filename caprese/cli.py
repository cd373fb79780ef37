"""The `caprese` command line: one subcommand per part of the Python API."""

from __future__ import annotations

import argparse
import sys

from caprese import info, models, pipeline
from caprese.bench import latency
from caprese.distillation import command as distill_command
from caprese.evaluate import command as eval_command
from caprese.evaluate import lm_eval_command, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caprese",
        description="Low-rank distillation for sparsified LLM feed-forward blocks (Caprese).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    info.add_cli(subparsers)
    models.add_cli(subparsers)
    distill_command.add_cli(subparsers)
    latency.add_cli(subparsers)
    eval_command.add_cli(subparsers)
    lm_eval_command.add_cli(subparsers)
    report.add_cli(subparsers)
    pipeline.add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in result files: the exact command that produced them
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"caprese {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
