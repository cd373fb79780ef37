"""`caprese lm-eval`: lm-evaluation-harness tasks on full / method / Caprese -> results JSON."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import torch

from caprese.evaluate.command import (
    add_variant_options,
    describe_variant,
    dtype_record,
    prepare_model,
)
from caprese.io import atomic_write_text


def run(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise RuntimeError("caprese lm-eval needs lm-evaluation-harness: pip install lm-eval"
                           ) from error
    from caprese.evaluate.lm_eval_bridge import CapreseLM

    if args.include_path and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"--include-path {args.include_path} is not a folder of task YAML")
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = describe_variant(args)
    model, tokenizer, weights = prepare_model(args)
    lm = CapreseLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                   max_gen_toks=args.max_new_tokens)
    started = time.perf_counter()
    output = lm_eval.simple_evaluate(
        model=lm, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=TaskManager(include_path=args.include_path), random_seed=args.seed,
        numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    record = {
        "task": f"lm-eval:{args.tasks}", "variant": variant,
        "summary": output["results"], "settings": {"num_fewshot": args.num_fewshot,
                                                   "max_length": args.max_length,
                                                   "max_new_tokens": args.max_new_tokens},
        "setup": {"model": args.model, "weights": weights, **dtype_record(args),
                  "device": args.device, "threads": torch.get_num_threads(),
                  "limit": args.limit, "seconds": time.perf_counter() - started,
                  "lm_eval": lm_eval.__version__, "command": "caprese " + shlex.join(args.argv)}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2, default=str))
    print(json.dumps(output["results"], indent=2, default=str))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "lm-eval", help="run lm-evaluation-harness tasks with Caprese phases intact",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_variant_options(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="folder of extra task YAML files (local tasks)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=int, help="first N documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="tokens of context per request")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation tasks' default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="results JSON")
    p.set_defaults(func=run)
