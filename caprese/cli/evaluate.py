"""`caprese eval`, `caprese lm-eval` and `caprese report`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from caprese import distributed
from caprese.cli.common import add_model_options, count, fraction, load_for
from caprese.compiled import BACKENDS
from caprese.distillation.settings import STAGES
from caprese.evaluate.protocols import PROTOCOLS
from caprese.evaluate.report import build_report
from caprese.evaluate.tasks import TASKS, EvalTask, check_output, evaluate
from caprese.evaluate.variant import VARIANT_METHODS, Variant, applied
from caprese.io import atomic_write_text, json_object_with, refuse_foreign


def add_variant_options(p: argparse.ArgumentParser) -> None:
    """Which model variant to load: shared by `caprese eval` and `caprese lm-eval`."""
    add_model_options(p)
    p.add_argument("--adapter", help="Caprese adapter directory (omit: the method alone)")
    p.add_argument("--method", default="none", choices=VARIANT_METHODS,
                   help="without --adapter: none = the full model")
    p.add_argument("--density", type=fraction, default=0.5)
    p.add_argument("--label", help="name of this variant in reports")
    p.add_argument("--reselect-every", type=count(0), metavar="RHO",
                   help="GRIFFIN: every RHO generated tokens, run them through the dense "
                   "model (their KV entries replaced), add their neuron scores and select "
                   "again (0: the full model; default: never)")
    p.add_argument("--cpu-kernels", action="store_true",
                   help="decode single tokens with caprese's CPU kernels (bf16 on a CPU, "
                   "where PyTorch's one-token products are slow: docs/BENCHMARKS.md); they "
                   "apply when one row is left to decode, so use them with --batch-size 1")
    p.add_argument("--stage", choices=STAGES,
                   help="the adapter's distillation stage (adapters record it since caprese "
                   "0.2; this overrides)")


def variant_from(args: argparse.Namespace) -> Variant:
    return Variant(args.model, method=args.method, density=args.density, adapter=args.adapter,
                   stage=args.stage, label=args.label, reselect_every=args.reselect_every,
                   cpu_kernels=args.cpu_kernels)


def run_eval(args: argparse.Namespace) -> int:
    variant = variant_from(args)
    task = EvalTask(args.task, limit=args.limit, max_new_tokens=args.max_new_tokens,
                    max_length=args.max_length, batch_size=args.batch_size,
                    temperature=args.temperature, top_p=args.top_p, samples=args.samples,
                    seed=args.seed, compile=args.compile, protocol=args.protocol)
    described = variant.describe()  # a bad adapter or output is refused before the model loads
    check_output(Path(args.out))
    task.records()
    model, tokenizer, setup = load_for(args)
    with applied(model, variant):
        result = evaluate(model, tokenizer, described, task, args.out, setup)
    if distributed.is_main():
        print(json.dumps({"task": task.task, "variant": described["label"],
                          **{k: v for k, v in result["summary"].items() if k != "layers"}},
                         indent=2))
    return 0


def run_lm_eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise RuntimeError("caprese lm-eval needs lm-evaluation-harness: pip install lm-eval"
                           ) from error
    from caprese.evaluate.lm_eval_bridge import CapreseLM

    if args.include_path and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"--include-path {args.include_path} is not a folder of task YAML")
    variant = variant_from(args)
    described = variant.describe()
    out = Path(args.out)
    refuse_foreign(out, json_object_with(out, ("task", "variant", "summary")),
                   "a caprese lm-eval result")
    task_manager = TaskManager(include_path=args.include_path)
    names = args.tasks.split(",")
    unknown = sorted(set(names) - set(task_manager.match_tasks(names)))
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(unknown)}; list them with "
                         "`lm-eval ls tasks` (local tasks: --include-path DIR)")
    model, tokenizer, setup = load_for(args)
    lm = CapreseLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                   max_gen_toks=args.max_new_tokens)
    started = time.perf_counter()
    with applied(model, variant):
        output = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=args.num_fewshot,
            limit=args.limit, task_manager=task_manager,
            random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
            fewshot_random_seed=args.seed)
    record = {
        "task": f"lm-eval:{args.tasks}", "variant": described,
        "summary": output["results"], "settings": {"num_fewshot": args.num_fewshot,
                                                   "max_length": args.max_length,
                                                   "max_new_tokens": args.max_new_tokens},
        "setup": {**setup, "threads": torch.get_num_threads(), "limit": args.limit,
                  "seconds": time.perf_counter() - started, "lm_eval": lm_eval.__version__}}
    atomic_write_text(out, json.dumps(record, indent=2, default=str))
    print(json.dumps(output["results"], indent=2, default=str))
    return 0


def run_report(args: argparse.Namespace) -> int:
    out = build_report(args.results, args.out, args.intro, args.title, args.distill)
    print(f"report written to {out}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate full / method / Caprese on a task",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_variant_options(p)
    p.add_argument("--task", required=True, help=f"{', '.join(TASKS)}, or a .jsonl file")
    p.add_argument("--limit", type=count(1), help="first N problems only (default: all)")
    p.add_argument("--out", required=True, help="results JSON (a .jsonl of records beside it)")
    p.add_argument("--protocol", default="greedy", choices=list(PROTOCOLS),
                   help="greedy: one answer per problem, 512 new tokens (instruct models); "
                   "thinking: the paper's protocol for reasoning models (temperature 0.6, "
                   "top-p 0.95, 4 runs, 32768 new tokens, the answer after </think>, mean "
                   "and spread over runs, pass@k); the four flags below override it")
    p.add_argument("--max-new-tokens", type=count(1), help="default: the protocol's")
    p.add_argument("--max-length", type=count(2), default=1024, help="fidelity: tokens per sample")
    p.add_argument("--batch-size", type=count(1), default=8)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the protocol's)")
    p.add_argument("--top-p", type=fraction, help="default: the protocol's")
    p.add_argument("--samples", type=count(1),
                   help="completions per problem, for pass@k (default: the protocol's)")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--compile", nargs="?", const="inductor", choices=BACKENDS,
                   help="decode steps compiled by torch.compile with this backend (inductor "
                   "if none is named; CUDA graphs on GPUs); the first batch pays for it")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser(
        "lm-eval", help="run lm-evaluation-harness tasks with Caprese phases intact",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_variant_options(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="folder of extra task YAML files (local tasks)")
    p.add_argument("--num-fewshot", type=count(0))
    p.add_argument("--limit", type=count(1), help="first N documents per task")
    p.add_argument("--batch-size", type=count(1), default=8)
    p.add_argument("--max-length", type=count(2), default=2048,
                   help="tokens of context per request")
    p.add_argument("--max-new-tokens", type=count(1), default=256, help="generation tasks' default")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--out", required=True, help="results JSON")
    p.set_defaults(func=run_lm_eval)

    p = subparsers.add_parser("report", help="markdown report + plots from eval result JSON")
    p.add_argument("results", nargs="+", help="result JSON files written by caprese eval")
    p.add_argument("--out", default="report.md")
    p.add_argument("--title", default="Caprese evaluation report")
    p.add_argument("--intro", help="markdown file placed under the title (setup, notes)")
    p.add_argument("--distill", nargs="+", default=[], metavar="RUN_FOLDER",
                   help="caprese distill run folders (run.json + summary.json): a table of "
                   "what each trained on, kept and cost")
    p.set_defaults(func=run_report)
