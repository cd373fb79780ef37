"""`caprese distill`: model + method + training mixture -> an adapter directory."""

from __future__ import annotations

import argparse
import sys

from caprese import distributed
from caprese.cli.common import add_model_options, count, fraction, load_for, positive, share
from caprese.config import CapreseConfig
from caprese.distillation import SOLVERS, STAGES, DistillJob, DistillSettings, run_job
from caprese.distillation.job import CONTINUATIONS, GENERAL_SHARE, harm_lines, stage_summary
from caprese.distillation.settings import OBJECTIVES
from caprese.methods import METHODS


def parse_layers(text: str | None) -> list[int] | None:
    """"0-13" or "0,2,4" (or both, comma-separated) as a list of layer indices."""
    if not text:
        return None
    layers: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        layers.extend(range(int(first), int(last or first) + 1))
    return layers


def job_from(args: argparse.Namespace) -> DistillJob:
    settings = DistillSettings(
        stages=tuple(args.stages.split(",")), solver=args.solver, ridge=args.ridge,
        capture_batch=args.batch_size, sgd_lr=args.sgd_lr, sgd_batch=args.sgd_batch,
        sgd_epochs=args.sgd_epochs, e2e_lr=args.e2e_lr, e2e_objective=args.e2e_objective,
        e2e_batch=args.e2e_batch, e2e_epochs=args.e2e_epochs, e2e_samples=args.e2e_samples,
        micro_batch=args.micro_batch, warmup=args.warmup,
        min_warmup_steps=args.min_warmup_steps,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
        seed=args.seed)
    config = CapreseConfig(method=args.method, density=args.density, rank=args.rank,
                           layers=parse_layers(args.layers))
    return DistillJob(config, settings, data=tuple(args.data.split(",")), samples=args.samples,
                      held_out=args.held_out, max_length=args.max_length,
                      continuations=args.continuations, general_share=args.general_share,
                      generation_batch=args.generation_batch,
                      teacher_cache=args.teacher_text, init_from=args.init_from)


def run(args: argparse.Namespace) -> int:
    job = job_from(args)  # settings are checked before the model loads
    model, tokenizer, setup = load_for(args)
    summary = run_job(model, tokenizer, job, args.out, resume=args.resume,
                      run_info={"model": args.model, "dtype": setup["dtype"]})
    if distributed.is_main():
        print(stage_summary(summary))
        for line in harm_lines(summary, args.method.upper()):
            print(line, file=sys.stderr if line.startswith("WARNING") else sys.stdout)
        print(f"adapter written to {args.out}")
    return 0


def add_cli(subparsers) -> None:
    defaults = DistillSettings()
    p = subparsers.add_parser("distill", help="distill the Caprese path into an adapter",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--method", default="griffin", choices=list(METHODS))
    p.add_argument("--density", type=fraction, default=0.5)
    p.add_argument("--rank", type=count(1), default=256)
    p.add_argument("--layers", help="e.g. 0-13 or 0,2,4 (default: the method's own)")
    p.add_argument(
        "--solver", default=defaults.solver, choices=list(SOLVERS),
        help="layer-wise fit: closed_form (one pass, original inputs: the paper's objective), "
        "sgd (the paper's recipe), closed_form+sgd, or sequential (closed form layer by "
        "layer on the compressed model's own inputs, toward the original hidden states: "
        "closer to the original model, slower, hidden states on disk; not for Gemma 2/3)")
    p.add_argument("--stages", default="layerwise,e2e", help=f"comma list of {STAGES}")
    p.add_argument("--data", default="gsm8k,math", help="comma list of training sources")
    p.add_argument("--samples", type=count(1), default=20_000, help="training samples")
    p.add_argument("--held-out", type=count(0), default=200,
                   help="samples kept out of training: each layer's path is cut back to what "
                   "helps on them, and the adapter is checked against the method alone")
    p.add_argument("--max-length", type=count(2), default=1024,
                   help="truncate sequences to this many tokens")
    p.add_argument("--continuations", default="teacher", choices=CONTINUATIONS,
                   help="train on the original model's own greedy outputs for the prompts "
                   "(generated once, cached in --out; what decoding visits), or on the data "
                   "set's reference solutions")
    p.add_argument("--general-share", type=share, default=GENERAL_SHARE,
                   help="share of the samples (train and held-out) that are general text: "
                   "XSum articles 500-999 as plain text, so the path does not learn a "
                   "math-only correction")
    p.add_argument("--generation-batch", type=count(1), default=8,
                   help="prompts per batch for teacher text")
    p.add_argument("--teacher-text", metavar="FILE",
                   help="the teacher-text cache to read and extend (default: "
                   "teacher_text.jsonl in --out); runs on the same model, prompts and "
                   "--max-length can share one, so the text is generated once")
    p.add_argument("--out", required=True, help="run and adapter directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init-from", metavar="ADAPTER_DIR",
                   help="start L and R from this adapter (e.g. RUN/stages/layerwise with "
                   "--stages e2e)")
    p.add_argument("--batch-size", type=count(1), default=defaults.capture_batch,
                   help="sequences per teacher pass when collecting statistics")
    p.add_argument("--micro-batch", type=count(1), default=defaults.micro_batch,
                   help="sequences per forward in SGD / E2E (gradient accumulation)")
    p.add_argument("--ridge", type=positive, default=defaults.ridge)
    p.add_argument("--sgd-lr", type=positive, default=defaults.sgd_lr)
    p.add_argument("--sgd-batch", type=count(1), default=defaults.sgd_batch,
                   help="sequences per SGD step")
    p.add_argument("--sgd-epochs", type=count(1), default=defaults.sgd_epochs)
    p.add_argument("--e2e-lr", type=positive, default=defaults.e2e_lr)
    p.add_argument("--e2e-batch", type=count(1), default=defaults.e2e_batch,
                   help="sequences per E2E step")
    p.add_argument("--e2e-epochs", type=count(1), default=defaults.e2e_epochs)
    p.add_argument("--e2e-objective", default=defaults.e2e_objective, choices=OBJECTIVES,
                   help="mse: last hidden states (the paper); kl: KL(teacher || student) of "
                   "the logits")
    p.add_argument("--e2e-samples", type=count(1), help="E2E on the first N samples (default: all)")
    p.add_argument("--warmup", type=float, default=defaults.warmup,
                   help="warm-up fraction of SGD / E2E steps")
    p.add_argument("--min-warmup-steps", type=count(0), default=defaults.min_warmup_steps,
                   help="warm up at least this many steps (short runs)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=count(1), default=defaults.checkpoint_every,
                   help="steps (or statistics batches) between checkpoints")
    p.add_argument("--checkpoint-minutes", type=positive, default=defaults.checkpoint_minutes,
                   help="also checkpoint when this many minutes have passed since the last "
                        "one (a kill loses at most that much work)")
    p.add_argument("--seed", type=count(0), default=defaults.seed)
    p.set_defaults(func=run)
