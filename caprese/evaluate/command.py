"""`caprese eval`: one model variant on one task -> results JSON (+ JSONL per problem).

The variant is chosen by options: `--method none` is the full model, a method without an
adapter is the method alone, an adapter is Caprese (its saved method and density apply).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import asdict
from pathlib import Path

import torch

from caprese.adapter import attach, load, read_config
from caprese.config import CapreseConfig
from caprese.dtypes import DTYPE_CHOICES, resolve_dtype
from caprese.evaluate.generation import GenerationSettings
from caprese.io import atomic_write_text

MATH_TASKS = ("gsm-symbolic", "gsm-symbolic-all", "gsm8k", "math500", "aime24", "amc23")
TASKS = (*MATH_TASKS, "xsum", "fidelity", "fidelity-language")


def describe_variant(args: argparse.Namespace) -> dict:
    if args.adapter:
        config, _ = read_config(args.adapter)
        stage = "e2e" if "e2e" in Path(args.adapter).parts else (
            "layerwise" if "layerwise" in Path(args.adapter).parts else "caprese")
        kind = args.stage or stage
        return {"kind": kind, "method": config.method, "density": config.density,
                "rank": config.rank, "adapter": str(args.adapter),
                "label": args.label or f"Caprese {kind} ({config.method})"}
    if args.method == "none":
        return {"kind": "full", "method": "", "label": args.label or "full"}
    return {"kind": "method", "method": args.method, "density": args.density,
            "label": args.label or f"{args.method} {args.density:g}"}


def dtype_record(args: argparse.Namespace) -> dict:
    """The dtype a run used and why, for its results file."""
    choice = resolve_dtype(args.dtype, args.device)
    return {"dtype": choice.name, "dtype_reason": choice.reason}


def prepare_model(args: argparse.Namespace):
    from caprese.models import load_model, weights_description

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.adapter:
        load(model, args.adapter)
    elif args.method != "none":
        attach(model, CapreseConfig(method=args.method, density=args.density, rank=None))
    return model, tokenizer, weights_description(args.model)


def load_records(task: str, limit: int | None):
    from caprese import data

    name = "xsum" if task.startswith("fidelity-language") else task
    if Path(task).suffix == ".jsonl":
        records = data.load("math", task)
    elif task == "fidelity":
        records = data.load("math500")
    else:
        records = data.load(name)
    return records[:limit] if limit else records


def run_task(args, model, tokenizer, records) -> dict:
    from caprese import data, prompts
    from caprese.evaluate.fidelity import fidelity
    from caprese.evaluate.language import evaluate_xsum
    from caprese.evaluate.math import evaluate_math

    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        temperature=args.temperature, top_p=args.top_p, samples=args.samples, seed=args.seed)
    if args.task == "xsum":
        settings.stop = tuple(data.XSUM_GENERATION["stop"])
        settings.max_new_tokens = min(args.max_new_tokens, data.XSUM_GENERATION["max_new_tokens"])
        return {"settings": asdict(settings), **evaluate_xsum(model, tokenizer, records,
                                                              settings)}
    if args.task.startswith("fidelity"):
        samples = prompts.teacher_forced(tokenizer, records, language=args.task != "fidelity",
                                      max_length=args.max_length)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return {"summary": fidelity(model, samples, batch_size=args.batch_size, pad_id=pad),
                "records": []}
    result = evaluate_math(model, tokenizer, records, prompts.chat_prompt, settings, args.task)
    return {"settings": asdict(settings), **result}


def run(args: argparse.Namespace) -> int:
    if args.task not in TASKS and not args.task.endswith(".jsonl"):
        raise ValueError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)} "
                         "or a local .jsonl file")
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = describe_variant(args)
    model, tokenizer, weights = prepare_model(args)
    records = load_records(args.task, args.limit)
    started = time.perf_counter()
    result = run_task(args, model, tokenizer, records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_problem = out.with_suffix(".jsonl")
    atomic_write_text(per_problem, "".join(json.dumps(r) + "\n" for r in result["records"]))
    record = {
        "task": args.task, "variant": variant, "summary": result["summary"],
        "settings": result.get("settings"), "records_file": per_problem.name,
        "setup": {"model": args.model, "weights": weights, **dtype_record(args),
                  "device": args.device, "threads": torch.get_num_threads(),
                  "limit": args.limit, "seconds": time.perf_counter() - started,
                  "command": "caprese " + shlex.join(args.argv)}}
    atomic_write_text(out, json.dumps(record, indent=2))
    print(json.dumps({"task": args.task, "variant": variant["label"],
                      **{k: v for k, v in result["summary"].items() if k != "layers"}}, indent=2))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate full / method / Caprese on a task",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_variant_options(p)
    p.add_argument("--task", required=True, help=f"{', '.join(TASKS)}, or a .jsonl file")
    p.add_argument("--limit", type=int, help="first N problems only")
    p.add_argument("--out", required=True, help="results JSON (a .jsonl of records beside it)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-length", type=int, default=1024, help="fidelity: tokens per sample")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=1, help="completions per problem (pass@k)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def add_variant_options(p: argparse.ArgumentParser) -> None:
    """Which model variant to load: shared by `caprese eval` and `caprese lm-eval`."""
    p.add_argument("--model", required=True, help="built-in name, local folder or Hub id")
    p.add_argument("--adapter", help="Caprese adapter directory (omit: the method alone)")
    p.add_argument("--method", default="none", choices=["none", "griffin", "cats"],
                   help="without --adapter: none = the full model")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--label", help="name of this variant in reports")
    p.add_argument("--stage", choices=["layerwise", "e2e"], help="adapter's distillation stage")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bf16 where the device computes it in hardware, else fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
