"""`caprese pipeline`: the main job, end to end, on one machine.

prepare the model -> distill Caprese for GRIFFIN and CATS (layer-wise closed form, then
E2E) -> evaluate full / method / layer-wise Caprese / E2E Caprese on held-out math, fidelity
and language -> one report. Every step is a `caprese` command (recorded in its results) and
is skipped when its output already exists, so an interrupted pipeline resumes where it was.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from caprese.dtypes import DTYPE_CHOICES


@dataclass(frozen=True)
class Preset:
    model: str
    samples: int  # distillation samples
    max_length: int  # tokens per training sequence
    e2e_samples: int  # the E2E stage trains on the first e2e_samples of them
    e2e_epochs: int
    math_problems: int  # GSM8K test problems (GSM-Symbolic originals)
    max_new_tokens: int
    xsum_articles: int
    fidelity_samples: int  # held-out math solutions
    language_samples: int  # plain-text fidelity (XSum articles: ~740 tokens each, the costliest)
    math_batch: int = 20  # one batch of 20 decodes ~1.5x faster per token than 8 on 2 cores


PRESETS = {
    # Sized for under 45 minutes on 2 CPU cores (7 variants x 4 tasks + 2 distillations);
    # wall time in the README, measured with `time caprese pipeline`.
    "default": Preset("qwen2.5-coder-0.5b-instruct", samples=256, max_length=384,
                      e2e_samples=64, e2e_epochs=1, math_problems=40, max_new_tokens=256,
                      xsum_articles=24, fidelity_samples=24, language_samples=8),
    # A smoke run of every step, under 10 minutes: the numbers mean nothing (128 new tokens
    # truncate most GSM8K solutions, 48 samples overfit the closed form).
    "quick": Preset("qwen2.5-coder-0.5b-instruct", samples=48, max_length=256,
                    e2e_samples=16, e2e_epochs=1, math_problems=6, max_new_tokens=128,
                    xsum_articles=4, fidelity_samples=4, language_samples=2, math_batch=6),
}


def _run(argv: list[str], output: Path) -> None:
    from caprese.cli import main

    if output.exists():
        print(f"[pipeline] {output} exists: skipping `caprese {' '.join(argv)}`", flush=True)
        return
    print(f"[pipeline] caprese {' '.join(argv)}", flush=True)
    if main(argv) != 0:
        raise RuntimeError(f"step failed: caprese {' '.join(argv)}")


def run_pipeline(preset: Preset, out: Path, methods: tuple[str, ...] = ("griffin", "cats"),
                 device: str | None = None, dtype: str = "auto") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    common = ["--model", preset.model, "--dtype", dtype]
    common += ["--device", device] if device else []
    from caprese.models import BUILTIN_MODELS, prepare

    if preset.model in BUILTIN_MODELS:
        prepare(preset.model)
    for method in methods:
        _run(["distill", *common, "--method", method, "--density", "0.5", "--rank", "256",
              "--solver", "closed_form", "--stages", "layerwise,e2e", "--data", "gsm8k,math",
              "--samples", str(preset.samples), "--max-length", str(preset.max_length),
              "--held-out", "0", "--e2e-epochs", str(preset.e2e_epochs),
              "--e2e-samples", str(preset.e2e_samples), "--out", str(out / f"adapter-{method}")],
             out / f"adapter-{method}" / "summary.json")
    variants = [("full", ["--method", "none"])]
    for method in methods:
        adapter = out / f"adapter-{method}"
        variants += [(method, ["--method", method, "--density", "0.5"]),
                     (f"{method}-layerwise", ["--adapter", str(adapter / "stages" / "layerwise"),
                                              "--stage", "layerwise"]),
                     (f"{method}-e2e", ["--adapter", str(adapter), "--stage", "e2e"])]
    tasks = [("gsm-symbolic-all", preset.math_problems,
              ["--max-new-tokens", str(preset.max_new_tokens),
               "--batch-size", str(preset.math_batch)]),
             ("xsum", preset.xsum_articles, []),
             ("fidelity", preset.fidelity_samples, []),
             ("fidelity-language", preset.language_samples, [])]
    results = []
    for name, options in variants:
        for task, limit, extra in tasks:
            if task.startswith("fidelity") and name == "full":
                continue  # the full model is its own teacher
            result = out / "results" / f"{task}-{name}.json"
            _run(["eval", *common, *options, "--task", task, "--limit", str(limit), *extra,
                  "--out", str(result)], result)
            results.append(str(result))
    from caprese.evaluate.report import build_report

    report = build_report(results, out / "report.md")
    print(f"[pipeline] done in {(time.perf_counter() - started) / 60:.1f} min: {report}")
    return report


def run(args: argparse.Namespace) -> int:
    preset = PRESETS["quick" if args.quick else "default"]
    if args.model:
        preset = Preset(**{**asdict(preset), "model": args.model})
    run_pipeline(preset, Path(args.out), device=args.device, dtype=args.dtype)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="the main job: distill, evaluate, report")
    p.add_argument("--out", default="caprese-run")
    p.add_argument("--quick", action="store_true", help="a smoke run of every step (<10 min)")
    p.add_argument("--model", help="override the preset's model (built-in name, folder, Hub id)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="of every step; auto: bf16 on GPUs and on CPUs with AVX512_BF16 or "
                   "AMX, fp32 on other CPUs (where bf16 runs in software, several times slower)")
    p.set_defaults(func=run)
