"""`caprese models list|prepare` and `caprese info`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from caprese.cli.common import count, fraction
from caprese.config import CapreseConfig
from caprese.info import budget, format_budget, load_config
from caprese.methods import METHODS
from caprese.models import (
    BUILTIN_MODELS,
    PROVENANCE_FILE,
    list_models,
    model_dir,
    prepare,
    ready_adapters,
    weights_description,
)


def run_list(args: argparse.Namespace) -> int:
    for model in list_models():
        folder = model_dir(model.name)
        state = str(folder) if (folder / PROVENANCE_FILE).is_file() else "not prepared"
        print(f"{model.name:30} {model.architecture:20} {model.license.split(' (')[0]:18} {state}")
    ready = ready_adapters.list_ready()
    if ready:
        print("\nready-made adapters (--adapter NAME):")
        for name in ready:
            print(f"  {ready_adapters.PREFIX}{name}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    folder = prepare(args.name)
    print(folder)
    print(weights_description(folder))
    return 0


def run_info(args: argparse.Namespace) -> int:
    caprese = CapreseConfig(
        method=args.method, density=args.density, rank=None if args.rank == 0 else args.rank
    )
    source = args.model
    if source in BUILTIN_MODELS:  # its config comes with the prepared weights
        source = model_dir(source) / "config.json"
        if not source.is_file():
            raise FileNotFoundError(f"{args.model} is not prepared yet: run `caprese models "
                                    f"prepare {args.model}` first")
    result = budget(load_config(str(source)), caprese)
    print(json.dumps(asdict(result), indent=2) if args.json else format_budget(result))
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list or prepare the built-in models")
    commands = parser.add_subparsers(dest="models_command", required=True)
    commands.add_parser("list", help="list the built-in models and where they are prepared"
                        ).set_defaults(func=run_list)
    prepare_parser = commands.add_parser(
        "prepare", help="install, assemble, verify and convert a built-in model (once)")
    prepare_parser.add_argument("name", help="built-in model name (see `caprese models list`)")
    prepare_parser.set_defaults(func=run_prepare)

    parser = subparsers.add_parser(
        "info", help="parameter budget of a model under a method and Caprese (no weights loaded)")
    parser.add_argument("--model", required=True,
                        help="config.json file, model folder, or Hugging Face model id")
    parser.add_argument("--method", default="griffin", choices=list(METHODS))
    parser.add_argument("--density", type=fraction, default=0.5)
    parser.add_argument("--rank", type=count(0), default=256, help="0 for the method alone")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_info)
