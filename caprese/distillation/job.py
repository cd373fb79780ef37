"""A whole distillation job on a loaded model: attach, training data, teacher text, distill.

`caprese distill` and the main job both build a DistillJob and call `run_job`, so a step
of the pipeline is this function call, not a command line re-parsed; the model stays loaded
across steps (the job detaches what it attached, leaving the base model as it found it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from caprese.adapter import attach, detach, load_weights
from caprese.config import CapreseConfig
from caprese.data import training_split
from caprese.distillation.run import (
    check_solver,
    claim_run_dir,
    distill,
    run_record,
    start_run,
)
from caprese.distillation.settings import DistillSettings
from caprese.distillation.teacher_text import CACHE_FILE, teacher_continuations
from caprese.samples import at_least

CONTINUATIONS = ("reference", "teacher")


@dataclass(frozen=True)
class DistillJob:
    """What to distill, on which data; the model comes separately (it may be shared)."""

    caprese: CapreseConfig
    settings: DistillSettings = field(default_factory=DistillSettings)
    data: tuple[str, ...] = ("gsm8k", "math")
    samples: int = 20_000
    held_out: int = 200
    max_length: int | None = 1024
    # "reference": the data set's solutions; "teacher": the model's own greedy outputs for
    # the same prompts (generated once, cached in the run folder)
    continuations: str = "reference"
    generation_batch: int = 8
    init_from: str | None = None  # start L and R from this adapter (e.g. a layer-wise stage)

    def __post_init__(self) -> None:
        at_least("samples", self.samples, 1)
        at_least("held_out", self.held_out, 0)
        at_least("generation_batch", self.generation_batch, 1)
        if self.max_length is not None:
            at_least("max_length", self.max_length, 2, "(a prompt token and a continuation)")
        if not self.data or not all(isinstance(d, str) and d for d in self.data):
            raise ValueError(f"data must name at least one training source, got {self.data!r}")
        if self.continuations not in CONTINUATIONS:
            raise ValueError(f"continuations must be one of {CONTINUATIONS}, "
                             f"got {self.continuations!r}")

    def record(self) -> dict:
        """The job as JSON-ready values (run.json of the run folder holds it)."""
        return {"data": ",".join(self.data), "max_length": self.max_length,
                "continuations": self.continuations, "init_from": self.init_from}


def run_job(model, tokenizer, job: DistillJob, out: str | Path, resume: bool = False,
            run_info: dict | None = None) -> dict:
    """Distill `job` on the loaded model into run folder `out`; returns the summary."""
    out = Path(out)
    claim_run_dir(out, resume)  # before the data, the teacher text and any other cost
    attach(model, job.caprese)
    try:
        check_solver(model, job.settings)
        if job.init_from:
            load_weights(model, job.init_from)  # E2E then starts from that adapter's L, R
        train, held_out = training_split(tokenizer, job.data, job.samples, job.held_out,
                                         job.settings.seed, job.max_length)
        info = {**(run_info or {}), **job.record()}
        start_run(out, run_record(model, job.settings, len(train), len(held_out), info), resume)
        if job.continuations == "teacher":
            cache = out / CACHE_FILE
            train, held_out = (
                teacher_continuations(model, tokenizer, part, job.max_length, cache,
                                      job.generation_batch)
                for part in (train, held_out)
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # the folder is this run's now (start_run): distill continues it
        return distill(model, train, out, job.settings, held_out=held_out, resume=True,
                       pad_id=pad_id, run_info=info)
    finally:
        detach(model)


def stage_summary(summary: dict) -> str:
    """The summary without per-layer rows and per-step losses, for a terminal."""
    return json.dumps({stage: {k: v for k, v in result.items() if k not in ("layers", "losses")}
                       for stage, result in summary["stages"].items()}, indent=2)
