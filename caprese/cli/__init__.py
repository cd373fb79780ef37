"""The `caprese` command line: one subcommand per part of the Python API.

    distill.py   caprese distill          -> caprese.distillation.run_job
    evaluate.py  caprese eval / lm-eval / report -> caprese.evaluate
    bench.py     caprese bench            -> caprese.bench.latency.run_bench
    models.py    caprese models / info    -> caprese.models, caprese.info
    pipeline.py  caprese pipeline         -> caprese.pipeline.run_pipeline
"""

from __future__ import annotations

import argparse
import sys

from caprese import distributed
from caprese.cli import bench, distill, evaluate, models, pipeline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caprese",
        description="Low-rank distillation for sparsified LLM feed-forward blocks (Caprese).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (models, distill, bench, evaluate, pipeline):
        module.add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in result files: the exact command that produced them
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as error:  # said in one line, no traceback
        where = f" (rank {distributed.rank()})" if distributed.world_size() > 1 else ""
        print(f"caprese {args.command}{where}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"caprese {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.close()
