"""A whole distillation job on a loaded model: attach, training data, teacher text, distill.

`caprese distill` and the main job both build a DistillJob and call `run_job`, so a step
of the pipeline is this function call, not a command line re-parsed; the model stays loaded
across steps (the job detaches what it attached, leaving the base model as it found it).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from caprese.adapter import attach, detach, load_weights
from caprese.config import CapreseConfig
from caprese.data import training_split
from caprese.data.general import general_split
from caprese.distillation.harm import verdict
from caprese.distillation.run import (
    check_solver,
    claim_run_dir,
    distill,
    run_record,
    start_run,
)
from caprese.distillation.settings import DistillSettings
from caprese.distillation.teacher_text import CACHE_FILE, check_cache, teacher_continuations
from caprese.samples import at_least

CONTINUATIONS = ("teacher", "reference")
# The default recipe's share of general text; the ablation behind it is in docs/BENCHMARKS.md.
GENERAL_SHARE = 0.25


@dataclass(frozen=True)
class DistillJob:
    """What to distill, on which data; the model comes separately (it may be shared)."""

    caprese: CapreseConfig
    settings: DistillSettings = field(default_factory=DistillSettings)
    data: tuple[str, ...] = ("gsm8k", "math")
    samples: int = 20_000
    held_out: int = 200
    max_length: int | None = 1024
    # "teacher": the model's own greedy outputs for the prompts (generated once, cached in the
    # run folder); "reference": the data set's solutions
    continuations: str = "teacher"
    # the share of samples (train and held-out) that are general text, XSum articles 500-999
    general_share: float = GENERAL_SHARE
    generation_batch: int = 8
    teacher_cache: str | None = None  # the teacher-text cache file (None: in the run folder)
    init_from: str | None = None  # start L and R from this adapter (e.g. a layer-wise stage)

    def __post_init__(self) -> None:
        at_least("samples", self.samples, 1)
        at_least("held_out", self.held_out, 0)
        at_least("generation_batch", self.generation_batch, 1)
        if self.max_length is not None:
            at_least("max_length", self.max_length, 2, "(a prompt token and a continuation)")
        if not self.data or not all(isinstance(d, str) and d for d in self.data):
            raise ValueError(f"data must name at least one training source, got {self.data!r}")
        if (isinstance(self.general_share, bool) or not isinstance(self.general_share, (int, float))
                or not 0 <= self.general_share < 1):
            raise ValueError(f"general_share must be a fraction in [0, 1), got "
                             f"{self.general_share!r}")
        if self.continuations not in CONTINUATIONS:
            raise ValueError(f"continuations must be one of {CONTINUATIONS}, "
                             f"got {self.continuations!r}")

    def record(self) -> dict:
        """The job as JSON-ready values (run.json of the run folder holds it)."""
        return {"data": ",".join(self.data), "max_length": self.max_length,
                "continuations": self.continuations, "general_share": self.general_share,
                "init_from": self.init_from}

    def counts(self) -> tuple[int, int, int, int]:
        """(math train, math held-out, general train, general held-out) sample counts."""
        general = round(self.samples * self.general_share)
        general_held_out = round(self.held_out * self.general_share)
        return (self.samples - general, self.held_out - general_held_out, general,
                general_held_out)


def run_job(model, tokenizer, job: DistillJob, out: str | Path, resume: bool = False,
            run_info: dict | None = None) -> dict:
    """Distill `job` on the loaded model into run folder `out`; returns the summary."""
    out = Path(out)
    claim_run_dir(out, resume)  # before the data, the teacher text and any other cost
    if job.teacher_cache and job.continuations == "teacher":
        check_cache(Path(job.teacher_cache))
    attach(model, job.caprese)
    try:
        check_solver(model, job.settings)
        if job.init_from:
            load_weights(model, job.init_from)  # E2E then starts from that adapter's L, R
        info = {**(run_info or {}), **job.record()}
        train, held_out = _training_data(model, tokenizer, job, out, info, resume)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # the folder is this run's now (start_run): distill continues it
        return distill(model, train, out, job.settings, held_out=held_out, resume=True,
                       pad_id=pad_id, run_info=info)
    finally:
        detach(model)


def _training_data(model, tokenizer, job: DistillJob, out: Path, info: dict,
                   resume: bool) -> tuple[list, list]:
    """The math samples (with the teacher's continuations when asked) and the general-text
    share, shuffled together with the job's seed; claims the run folder first."""
    math_train, math_held_out, general_train, general_held_out = job.counts()
    seed = job.settings.seed
    train, held_out = training_split(tokenizer, job.data, math_train, math_held_out, seed,
                                     job.max_length)
    general = ([], [])
    if general_train or general_held_out:
        general = general_split(tokenizer, general_train, general_held_out, seed,
                                job.max_length)
    start_run(out, run_record(model, job.settings, len(train) + len(general[0]),
                              len(held_out) + len(general[1]), info), resume)
    if job.continuations == "teacher":  # math only: general text is real text already
        cache = Path(job.teacher_cache) if job.teacher_cache else out / CACHE_FILE
        train, held_out = (teacher_continuations(model, tokenizer, part, job.max_length, cache,
                                                 job.generation_batch)
                           for part in (train, held_out))
    train = train + general[0]
    random.Random(seed).shuffle(train)  # E2E's first e2e_samples then hold the same share
    return train, held_out + general[1]


def stage_summary(summary: dict) -> str:
    """The summary without per-layer rows and per-step losses, for a terminal."""
    return json.dumps({stage: {k: v for k, v in result.items() if k not in ("layers", "losses")}
                       for stage, result in summary["stages"].items()}, indent=2)


def harm_lines(summary: dict, method: str) -> list[str]:
    """What the do-no-harm check kept, and the final adapter against the method alone."""
    lines = []
    kept = summary.get("kept")
    if kept is not None:
        reduced = ", ".join(f"layer {layer}: rank {rank}"
                            for layer, rank in kept["reduced"].items())
        dropped = ", ".join(str(layer) for layer in kept["dropped"])
        lines.append(f"layers: {len(kept['full_rank'])} kept their full rank, "
                     f"{len(kept['reduced'])} a smaller one"
                     + (f" ({reduced})" if reduced else "")
                     + f", {len(kept['dropped'])} dropped" + (f" ({dropped})" if dropped else ""))
    if "adapter_check" in summary:
        lines.append(verdict(summary["adapter_check"], method))
    else:
        lines.append("not checked against the method alone: no held-out samples (--held-out 0)")
    return lines
