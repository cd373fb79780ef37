"""The main job, end to end on one machine, as typed steps on one loaded model.

prepare the model -> distill Caprese for GRIFFIN and CATS with the default recipe (the
model's own text plus a share of general text; layer-wise closed form cut back to what helps
on held-out text, then E2E) -> evaluate full / method / layer-wise Caprese / E2E Caprese on
the GSM-style test set, fidelity and language -> one report. Each step is a function call
(distillation.run_job, evaluate.tasks.evaluate) on the same loaded model, and is skipped when
its output already exists, so an interrupted pipeline resumes where it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from caprese import distributed
from caprese.config import CapreseConfig
from caprese.distillation import DistillJob, DistillSettings, run_job
from caprese.dtypes import cpu_has_amx, resolve_dtype
from caprese.evaluate.report import build_report
from caprese.evaluate.tasks import EvalTask, evaluate, load_setup
from caprese.evaluate.variant import Variant, applied
from caprese.models import load_model

METHODS = ("griffin", "cats")
DENSITY = 0.5
RANK = 256


@dataclass(frozen=True)
class Preset:
    model: str
    samples: int  # distillation samples
    held_out: int  # distillation samples kept out: the do-no-harm check scores them
    max_length: int  # tokens per training sequence
    e2e_samples: int  # the E2E stage trains on the first e2e_samples of them
    e2e_epochs: int
    math_problems: int  # the first N of the GSM-style test set (a template's 4 in a row)
    max_new_tokens: int
    xsum_articles: int
    fidelity_samples: int  # held-out math solutions
    language_samples: int  # plain-text fidelity (XSum articles: ~740 tokens each, the costliest)
    math_batch: int = 20  # one batch of 20 decodes ~1.5x faster per token than 8 on 2 cores
    generation_batch: int = 8  # prompts per teacher-text decode (DistillJob.generation_batch)


PRESETS = {
    # Sized for under 45 minutes on 2 CPU cores (7 variants x 4 tasks + 2 distillations);
    # wall times in the README, measured with `time bash scripts/main.sh`.
    # Where matrix products are fast (GPUs, CPUs with AMX tiles running bf16):
    # The teacher text (216 greedy decodes) took 15 of 57 minutes at 8 rows: 32 rows share
    # each weight read four ways, and all 40 problems decode as one batch.
    "default": Preset("qwen2.5-coder-0.5b-instruct", samples=256, held_out=32, max_length=384,
                      e2e_samples=64, e2e_epochs=1, math_problems=40, max_new_tokens=256,
                      xsum_articles=24, fidelity_samples=16, language_samples=8, math_batch=40,
                      generation_batch=32),
    # Every other CPU: fp32 anywhere, or bf16 through AVX512_BF16 alone, whose matrix products
    # ran at about half fp32's rate. `default` took over 112 min on such a 2-core Xeon and
    # ~85 min (estimated from per-step costs) in fp32 on a 2-core AVX-512 Xeon.
    "compact": Preset("qwen2.5-coder-0.5b-instruct", samples=64, held_out=16, max_length=256,
                      e2e_samples=16, e2e_epochs=1, math_problems=20, max_new_tokens=192,
                      xsum_articles=4, fidelity_samples=4, language_samples=2),
    # A smoke run of every step (7 min on a bf16 CPU, 23 in fp32; README): the numbers mean
    # nothing (128 new tokens truncate most GSM8K solutions, 48 samples overfit the fit).
    "quick": Preset("qwen2.5-coder-0.5b-instruct", samples=48, held_out=8, max_length=256,
                    e2e_samples=16, e2e_epochs=1, math_problems=6, max_new_tokens=128,
                    xsum_articles=4, fidelity_samples=4, language_samples=2, math_batch=6),
}


def distill_jobs(preset: Preset, out: Path) -> dict[str, DistillJob]:
    """One default-recipe job per method (layer-wise closed form + E2E on the model's own
    text and general text); both read one teacher-text cache, so it is generated once."""
    settings = DistillSettings(stages=("layerwise", "e2e"), solver="closed_form",
                               e2e_epochs=preset.e2e_epochs, e2e_samples=preset.e2e_samples)
    return {method: DistillJob(CapreseConfig(method=method, density=DENSITY, rank=RANK),
                               settings, data=("gsm8k", "math"), samples=preset.samples,
                               held_out=preset.held_out, max_length=preset.max_length,
                               teacher_cache=str(out / "teacher_text.jsonl"),
                               generation_batch=preset.generation_batch)
            for method in METHODS}


def variants(preset: Preset, out: Path) -> dict[str, Variant]:
    """full; per method: the method alone, layer-wise Caprese, E2E Caprese."""
    found = {"full": Variant(preset.model)}
    for method in METHODS:
        adapter = out / f"adapter-{method}"
        found[method] = Variant(preset.model, method=method, density=DENSITY)
        found[f"{method}-layerwise"] = Variant(preset.model,
                                               adapter=str(adapter / "stages" / "layerwise"))
        found[f"{method}-e2e"] = Variant(preset.model, adapter=str(adapter))
    return found


def tasks(preset: Preset) -> list[EvalTask]:
    return [EvalTask("gsm-symbolic-test", limit=preset.math_problems,
                     max_new_tokens=preset.max_new_tokens, batch_size=preset.math_batch),
            EvalTask("xsum", limit=preset.xsum_articles),
            EvalTask("fidelity", limit=preset.fidelity_samples),
            EvalTask("fidelity-language", limit=preset.language_samples)]


class _Model:
    """The base model, loaded at the first step that needs it and kept for the others."""

    def __init__(self, preset: Preset, dtype: str, device: str) -> None:
        self.preset, self.dtype, self.device = preset, dtype, device
        self.loaded = None

    def get(self):
        if self.loaded is None:
            self.loaded = load_model(self.preset.model, dtype=self.dtype, device=self.device)
        return self.loaded


def _skip(output: Path, step: str) -> bool:
    """Whether a step's output exists (every rank sees the same: steps end in a barrier)."""
    done = output.exists()
    if distributed.is_main():
        print(f"[pipeline] {output} exists: skipping {step}" if done else f"[pipeline] {step}",
              flush=True)
    return done


def run_pipeline(preset: Preset, out: Path, device: str | None = None, dtype: str = "auto",
                 command: str = "caprese pipeline") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = distributed.init(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = _Model(preset, dtype, device)
    choice = resolve_dtype(dtype, device)
    for method, job in distill_jobs(preset, out).items():
        run_dir = out / f"adapter-{method}"
        if not _skip(run_dir / "summary.json", f"distill {method} into {run_dir}"):
            model, tokenizer = base.get()
            run_job(model, tokenizer, job, run_dir, resume=True,  # its own folder: continued
                    run_info={"model": preset.model, "dtype": choice.name})
    results = []
    for name, variant in variants(preset, out).items():
        for task in tasks(preset):
            if task.task.startswith("fidelity") and name == "full":
                continue  # the full model is its own teacher
            result = out / "results" / f"{task.task}-{name}.json"
            results.append(str(result))
            if _skip(result, f"evaluate {name} on {task.task}"):
                continue
            model, tokenizer = base.get()
            setup = load_setup(preset.model, choice, device, command)
            with applied(model, variant):
                evaluate(model, tokenizer, variant.describe(), task, result, setup)
    report = out / "report.md"
    if distributed.is_main():
        build_report(results, report)
        print(f"[pipeline] done in {(time.perf_counter() - started) / 60:.1f} min: {report}")
    distributed.barrier()
    return report


def preset_name(quick: bool, dtype: str, device: str | None) -> str:
    """quick; default on a GPU or a CPU running bf16 on AMX tiles; compact on other CPUs."""
    if quick:
        return "quick"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type != "cpu":
        return "default"
    fast = resolve_dtype(dtype, device).name == "bf16" and cpu_has_amx()
    return "default" if fast else "compact"


def preset_for(quick: bool, model: str | None, dtype: str = "auto",
               device: str | None = None) -> Preset:
    preset = PRESETS[preset_name(quick, dtype, device)]
    return replace(preset, model=model) if model else preset
