"""Issue-4 evidence: how much of each method's KL gap the layer-wise and E2E stages close.

For GRIFFIN and CATS (density 0.5, r = 256) on a built-in model: the method alone,
layer-wise SGD, layer-wise closed form, and closed form + E2E, scored on held-out samples
of the same training sets (KL(teacher || student), top-1 agreement), plus the time of one
teacher pass over the training data, of the closed-form stage and of the SGD epochs.
Prints a table and writes benchmarks/results/distill_quality.json.

    python benchmarks/distill_quality.py --model qwen2.5-coder-0.5b-instruct --samples 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import caprese
from caprese.distillation import DistillSettings, distill
from caprese.distillation.batches import collate
from caprese.distillation.command import training_data
from caprese.dtypes import DTYPE_CHOICES, resolve_dtype
from caprese.evaluate.fidelity import fidelity
from caprese.io import atomic_write_text
from caprese.models import load_model, weights_description

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def teacher_pass_seconds(model, samples, batch_size: int, pad_id: int) -> float:
    """One plain forward of the original model over the samples (LM head included)."""
    started = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start:start + batch_size], pad_id)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return time.perf_counter() - started


def scored(model, held_out, pad_id, batch_size) -> dict:
    result = fidelity(model, held_out, batch_size=batch_size, pad_id=pad_id, layer_errors=False)
    return {"kl": result["kl"], "top1": result["top1"], "tokens": result["tokens"]}


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto: bf16 on CPUs with AVX512_BF16 or AMX, else fp32 (where bf16 "
                        "products run in software)")


def dtype_name(args: argparse.Namespace) -> str:
    return str(resolve_dtype(args.dtype).dtype).removeprefix("torch.")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Which training sets make the mixture, and how its prompts are written."""
    parser.add_argument("--sources", default="gsm8k,math")
    parser.add_argument("--plain-prompts", action="store_true",
                        help="no chat template: 'Please reason step by step.' + the question as "
                        "plain text (the issue's probe; the library's default is the template)")


def add_setup_args(parser: argparse.ArgumentParser) -> None:
    """The model, data split and adapter shape shared by the issue-4 scripts."""
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    add_dtype_arg(parser)
    add_data_args(parser)
    parser.add_argument("--methods", default="griffin,cats")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)


def load_model_for(args: argparse.Namespace) -> tuple:
    """(model, tokenizer) in --dtype; with --plain-prompts the tokenizer has no chat template,
    so caprese.prompts.templated writes its plain-text form."""
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if args.plain_prompts:
        tokenizer.chat_template = None
    return model, tokenizer


def mixture_split(tokenizer, args: argparse.Namespace, max_length: int) -> tuple:
    """(train, held_out): the seed-0 split of --sources, sequences cut at max_length."""
    return training_data(tokenizer, args.sources.split(","), args.samples, args.held_out,
                         seed=0, max_length=max_length)


def load_setup(args: argparse.Namespace) -> tuple:
    """(model, tokenizer, train, held_out, setup): the model and the seed-0 split."""
    model, tokenizer = load_model_for(args)
    train, held_out = mixture_split(tokenizer, args, args.max_length)
    setup = {**vars(args), "weights": weights_description(args.model),
             "threads": torch.get_num_threads(), "dtype": dtype_name(args)}
    return model, tokenizer, train, held_out, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(parser)
    parser.add_argument("--sgd-epochs", type=int, default=1,
                        help="epochs actually run (the paper's 20 are extrapolated from these)")
    parser.add_argument("--e2e-epochs", type=int, default=1)
    parser.add_argument("--e2e-samples", type=int, default=256,
                        help="E2E trains on the first N training samples")
    parser.add_argument("--e2e-lr", type=float, default=1e-4)
    parser.add_argument("--work", default="/tmp/caprese-distill-quality")
    parser.add_argument("--out", default=str(RESULTS / "distill_quality.json"))
    args = parser.parse_args()

    model, tokenizer, train, held_out, setup = load_setup(args)
    pad_id = tokenizer.pad_token_id or 0
    report = {"setup": {**setup, "train_tokens": sum(len(s.input_ids) for s in train),
                        "train_continuation_tokens": sum(len(s.input_ids) - s.boundary
                                                         for s in train)},
              "teacher_pass_s": teacher_pass_seconds(model, train, args.batch_size, pad_id),
              "methods": {}}
    print(f"teacher pass over {len(train)} samples: {report['teacher_pass_s']:.0f} s", flush=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    # Closed form (+ E2E) for every method first, then the slower SGD runs: the JSON is
    # rewritten after each result, so a run cut short keeps what it measured.
    for solver in ("closed_form", "sgd"):
        for method in methods:
            rows = report["methods"].setdefault(method, {})
            caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density,
                                                        rank=args.rank))
            if "method alone" not in rows:
                rows["method alone"] = scored(model, held_out, pad_id, args.batch_size)
            stages = ("layerwise", "e2e") if solver == "closed_form" else ("layerwise",)
            settings = DistillSettings(stages=stages, solver=solver, sgd_epochs=args.sgd_epochs,
                                       e2e_epochs=args.e2e_epochs, e2e_lr=args.e2e_lr,
                                       e2e_samples=args.e2e_samples, e2e_batch=16,
                                       micro_batch=4, capture_batch=args.batch_size,
                                       checkpoint_every=10**6)
            run_dir = work / f"{method}-{solver}"
            summary = distill(model, train, run_dir, settings, held_out=held_out, pad_id=pad_id)
            layerwise = summary["stages"]["layerwise"]
            name = "layer-wise SGD" if solver == "sgd" else "layer-wise closed form"
            caprese.load_weights(model, run_dir / "stages" / "layerwise")
            rows[name] = {**scored(model, held_out, pad_id, args.batch_size),
                          "stage_s": layerwise["seconds"], "timings": layerwise["timings"],
                          "layers": layerwise["layers"]}
            if "e2e" in stages:
                caprese.load_weights(model, run_dir)
                rows["closed form + E2E"] = {
                    **scored(model, held_out, pad_id, args.batch_size),
                    "stage_s": summary["stages"]["e2e"]["seconds"],
                    "losses": summary["stages"]["e2e"]["losses"]}
            caprese.detach(model)
            gap = rows["method alone"]["kl"]
            for row in rows.values():
                row["kl_gap_closed"] = 1 - row["kl"] / gap if gap > 0 else float("nan")
            print_table(method, rows, report["teacher_pass_s"], args.sgd_epochs)
            atomic_write_text(out, json.dumps(report, indent=2))


def print_table(method, rows, teacher_s, sgd_epochs) -> None:
    print(f"\n{method}: | variant | KL | top-1 % | KL gap closed | stage time s |")
    for name, row in rows.items():
        print(f"| {name} | {row['kl']:.4f} | {100 * row['top1']:.1f} | "
              f"{100 * row['kl_gap_closed']:.0f}% | {row.get('stage_s', 0):.0f} |")
    print(f"(teacher pass {teacher_s:.0f} s; SGD ran {sgd_epochs} epochs)", flush=True)


if __name__ == "__main__":
    main()
