"""Options several subcommands share, and loading the model they name."""

from __future__ import annotations

import argparse
import shlex

import torch

from caprese import distributed
from caprese.dtypes import DTYPE_CHOICES, resolve_dtype
from caprese.evaluate.tasks import load_setup
from caprese.models import load_model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device, --threads."""
    p.add_argument("--model", required=True, help="built-in name, local folder or Hub id")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bf16 where the device computes it in hardware, else fp32")
    p.add_argument("--device", default=default_device())
    p.add_argument("--threads", type=count(0), default=0, help="CPU threads (0: torch default)")


def load_for(args: argparse.Namespace):
    """(model, tokenizer, setup) for --model/--dtype/--device/--threads; `setup` is what a
    result file records about how the model was loaded, on what hardware (bf16 greedy
    answers can differ between CPUs, whose products round differently) and the command
    that ran."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = distributed.init(args.device)  # under torchrun: this rank's device
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    setup = load_setup(args.model, resolve_dtype(args.dtype, args.device), args.device,
                       command_line(args))
    return model, tokenizer, setup


def command_line(args: argparse.Namespace) -> str:
    """The command that is running, as a user would type it (main() records its argv)."""
    return "caprese " + shlex.join(args.argv)


def count(low: int):
    """An argparse type: an integer >= low, refused with the flag's name otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1] (densities, top-p)."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def share(text: str) -> float:
    """An argparse type: a number in [0, 1) (the share of a mixture)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def positive(text: str) -> float:
    """An argparse type: a finite number > 0 (learning rates, ridges)."""
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value
