"""`caprese distill`: model + method + training mixture -> an adapter directory."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from caprese.adapter import attach, load_weights
from caprese.config import CapreseConfig
from caprese.distillation import (
    SOLVERS,
    STAGES,
    DistillSettings,
    check_solver,
    distill,
    refuse_unresumed_run,
)
from caprese.distillation.teacher_text import CACHE_FILE, teacher_continuations
from caprese.dtypes import DTYPE_CHOICES, resolve_dtype


def truncate(samples, max_length: int | None):
    """Cut continuations so that no sequence exceeds max_length; drop prompts that do."""
    if max_length is None:
        return list(samples)
    kept = [s for s in samples if s.boundary < max_length]
    return [dataclasses.replace(s, input_ids=list(s.input_ids)[:max_length]) for s in kept]


def training_data(tokenizer, sources: list[str], samples: int, held_out: int, seed: int,
                  max_length: int | None):
    """Disjoint train and held-out samples drawn from one seeded mixture.

    Prompts longer than max_length are dropped, so a few extra samples are drawn to keep the
    requested counts.
    """
    from caprese.data import build_mixture

    wanted = samples + held_out
    mixture = truncate(build_mixture(tokenizer, sources, n=wanted + wanted // 8 + 8, seed=seed),
                       max_length)
    if len(mixture) < wanted:
        raise ValueError(f"only {len(mixture)} samples fit in --max-length {max_length}; "
                         "raise it or ask for fewer samples")
    return mixture[:samples], mixture[samples:wanted]


def run(args: argparse.Namespace) -> int:
    from caprese.models import load_model

    settings = DistillSettings(
        stages=tuple(args.stages.split(",")),
        solver=args.solver,
        ridge=args.ridge,
        capture_batch=args.batch_size,
        sgd_lr=args.sgd_lr,
        sgd_batch=args.sgd_batch,
        sgd_epochs=args.sgd_epochs,
        e2e_lr=args.e2e_lr,
        e2e_objective=args.e2e_objective,
        e2e_batch=args.e2e_batch,
        e2e_epochs=args.e2e_epochs,
        e2e_samples=args.e2e_samples,
        micro_batch=args.micro_batch,
        warmup=args.warmup,
        min_warmup_steps=args.min_warmup_steps,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    config = CapreseConfig(
        method=args.method, density=args.density, rank=args.rank, layers=_layers(args.layers)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    attach(model, config)
    check_solver(model, settings)  # before the data and any teacher-text generation
    if args.init_from:
        load_weights(model, args.init_from)  # E2E then starts from that adapter's L, R
    train, held_out = training_data(
        tokenizer, args.data.split(","), args.samples, args.held_out, args.seed, args.max_length
    )
    if args.continuations == "teacher":
        refuse_unresumed_run(Path(args.out), args.resume)
        cache = Path(args.out) / CACHE_FILE
        train, held_out = (
            teacher_continuations(model, tokenizer, part, args.max_length, cache,
                                  args.generation_batch)
            for part in (train, held_out)
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    info = {
        "model": args.model,
        "dtype": resolve_dtype(args.dtype, args.device).name,
        "data": args.data,
        "max_length": args.max_length,
        "continuations": args.continuations,
        "init_from": args.init_from,
    }
    summary = distill(
        model,
        train,
        args.out,
        settings,
        held_out=held_out,
        resume=args.resume,
        pad_id=pad_id,
        run_info=info,
    )
    print(
        json.dumps(
            {
                stage: {k: v for k, v in result.items() if k not in ("layers", "losses")}
                for stage, result in summary["stages"].items()
            },
            indent=2,
        )
    )
    print(f"adapter written to {args.out}")
    return 0


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    layers: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        layers.extend(range(int(first), int(last or first) + 1))
    return layers


def add_cli(subparsers) -> None:
    defaults = DistillSettings()
    p = subparsers.add_parser(
        "distill",
        help="distill the Caprese path into an adapter",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="built-in name, local folder or Hub id")
    p.add_argument("--method", default="griffin", choices=["griffin", "cats", "none"])
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--layers", help="e.g. 0-13 or 0,2,4 (default: the method's own)")
    p.add_argument(
        "--solver", default=defaults.solver, choices=list(SOLVERS),
        help="layer-wise fit: closed_form (one pass, original inputs: the paper's objective), "
        "sgd (the paper's recipe), closed_form+sgd, or sequential (closed form layer by "
        "layer on the compressed model's own inputs, toward the original hidden states: "
        "closer to the original model, slower, hidden states on disk; not for Gemma 2/3)",
    )
    p.add_argument("--stages", default="layerwise,e2e", help=f"comma list of {STAGES}")
    p.add_argument("--data", default="gsm8k,math", help="comma list of training sources")
    p.add_argument("--samples", type=int, default=20_000, help="training samples")
    p.add_argument(
        "--held-out",
        type=int,
        default=200,
        help="samples kept out of training for the residual report",
    )
    p.add_argument(
        "--max-length", type=int, default=1024, help="truncate sequences to this many tokens"
    )
    p.add_argument(
        "--continuations",
        default="reference",
        choices=["reference", "teacher"],
        help="train on the data set's solutions, or on the original model's own greedy "
        "outputs for the same prompts (generated once, cached in --out)",
    )
    p.add_argument(
        "--generation-batch", type=int, default=8, help="prompts per batch for teacher text"
    )
    p.add_argument("--out", required=True, help="run and adapter directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--init-from",
        metavar="ADAPTER_DIR",
        help="start L and R from this adapter (e.g. RUN/stages/layerwise with --stages e2e)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bf16 where the device computes it in hardware, else fp32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.capture_batch,
        help="sequences per teacher pass when collecting statistics",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=defaults.micro_batch,
        help="sequences per forward in SGD / E2E (gradient accumulation)",
    )
    p.add_argument("--ridge", type=float, default=defaults.ridge)
    p.add_argument("--sgd-lr", type=float, default=defaults.sgd_lr)
    p.add_argument(
        "--sgd-batch", type=int, default=defaults.sgd_batch, help="sequences per SGD step"
    )
    p.add_argument("--sgd-epochs", type=int, default=defaults.sgd_epochs)
    p.add_argument("--e2e-lr", type=float, default=defaults.e2e_lr)
    p.add_argument(
        "--e2e-batch", type=int, default=defaults.e2e_batch, help="sequences per E2E step"
    )
    p.add_argument("--e2e-epochs", type=int, default=defaults.e2e_epochs)
    p.add_argument(
        "--e2e-objective",
        default=defaults.e2e_objective,
        choices=["mse", "kl"],
        help="mse: last hidden states (the paper); kl: KL(teacher || student) of the logits",
    )
    p.add_argument("--e2e-samples", type=int, help="E2E on the first N samples (default: all)")
    p.add_argument(
        "--warmup", type=float, default=defaults.warmup, help="warm-up fraction of SGD / E2E steps"
    )
    p.add_argument(
        "--min-warmup-steps",
        type=int,
        default=defaults.min_warmup_steps,
        help="warm up at least this many steps (short runs)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(func=run)
