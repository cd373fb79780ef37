"""One evaluation step: a task on a loaded model variant -> a result JSON (+ per-problem JSONL).

`caprese eval` and the main job both build an EvalTask and call `evaluate`: math accuracy by
generation, XSum ROUGE, or fidelity to the original model (one teacher-forced forward).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from caprese import data, distributed, prompts
from caprese.compiled import BACKENDS
from caprese.data.general import RESERVED_ARTICLES, article_body, reserved
from caprese.dtypes import DtypeChoice
from caprese.evaluate import protocols
from caprese.evaluate.fidelity import fidelity
from caprese.evaluate.language import XSUM_MAX_NEW_TOKENS, XSUM_STOP, evaluate_xsum
from caprese.evaluate.math import evaluate_math
from caprese.generation import BatchJournal, GenerationSettings
from caprese.io import (
    atomic_write_text,
    json_object_with,
    refuse_foreign,
    remove_stale_temporaries,
    sha256_file,
)
from caprese.kernels.cpu import machine
from caprese.models import ready_adapters, weights_description
from caprese.samples import at_least

MATH_TASKS = ("gsm-symbolic", "gsm-symbolic-all", "gsm-symbolic-test", "gsm8k", "math500", "aime24",
              "amc23")
TASKS = (*MATH_TASKS, "xsum", "fidelity", "fidelity-language")
RESULT_KEYS = ("task", "variant", "summary")


@dataclass(frozen=True)
class EvalTask:
    """A task name (or a local .jsonl file of MATH-format problems) and how to run it."""

    task: str
    limit: int | None = None  # the first N problems only
    # None: the protocol's (evaluate/protocols.py: greedy 512 tokens, or thinking's sampling)
    max_new_tokens: int | None = None
    max_length: int = 1024  # fidelity: tokens per sample
    batch_size: int = 8
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    samples: int | None = None  # completions per problem (pass@k; runs, for thinking)
    seed: int = 0
    compile: str | None = None  # a caprese.compiled backend: decode steps compiled
    protocol: str = "greedy"

    def __post_init__(self) -> None:
        preset = protocols.protocol(self.protocol)
        for name in ("max_new_tokens", "temperature", "top_p", "samples"):
            if getattr(self, name) is None:  # frozen: set once, here
                object.__setattr__(self, name, getattr(preset, name))
        if self.task not in TASKS and not self.task.endswith(".jsonl"):
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)} "
                             "or a local .jsonl file")
        if self.limit is not None:
            at_least("limit", self.limit, 1, "(omit it to take every problem)")
            if self.task in ("xsum", "fidelity-language") and self.limit > len(RESERVED_ARTICLES):
                raise ValueError(f"{self.task} evaluates only the {len(RESERVED_ARTICLES)} "
                                 "reserved XSum articles (the others may be training input): "
                                 f"--limit at most {len(RESERVED_ARTICLES)}, got {self.limit}")
        for name, low in (("max_new_tokens", 1), ("max_length", 2), ("batch_size", 1),
                          ("samples", 1), ("seed", 0)):
            at_least(name, getattr(self, name), low)
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < 100):
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got "
                             f"{self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.compile is not None and self.compile not in BACKENDS:
            raise ValueError(f"unknown compile backend {self.compile!r}; choose one of "
                             f"{', '.join(BACKENDS)} (or none: eager decoding)")

    def records(self) -> list[data.Record]:
        if self.task.endswith(".jsonl"):
            records = data.load("math", self.task)
        elif self.task == "fidelity":
            records = data.load("math500")
        elif self.task == "fidelity-language":  # the article alone, as plain text
            records = [replace(r, prompt=article_body(r)) for r in reserved(data.load("xsum"))]
        elif self.task == "xsum":
            records = reserved(data.load("xsum"))
        else:
            records = data.load(self.task)
        if not records:
            raise ValueError(f"{self.task} holds no problems")
        return records[: self.limit] if self.limit else records

    def generation(self) -> GenerationSettings:
        settings = GenerationSettings(
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            temperature=self.temperature, top_p=self.top_p, samples=self.samples,
            seed=self.seed, compile=self.compile)
        if self.task == "xsum":
            settings = replace(settings, stop=XSUM_STOP,
                               max_new_tokens=min(self.max_new_tokens, XSUM_MAX_NEW_TOKENS))
        return settings


def run_task(model, tokenizer, task: EvalTask, journal: BatchJournal | None = None) -> dict:
    """{"summary", "records", "settings"} of `task` on the loaded model as it is (generated
    batches saved to, and resumed from, `journal`)."""
    records = task.records()
    if task.task.startswith("fidelity"):
        samples = prompts.teacher_forced(tokenizer, records,
                                         language=task.task != "fidelity",
                                         max_length=task.max_length)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return {"summary": fidelity(model, samples, batch_size=task.batch_size, pad_id=pad),
                "records": [], "settings": None}
    settings = task.generation()
    if task.task == "xsum":
        result = evaluate_xsum(model, tokenizer, records, settings, journal)
    else:
        result = evaluate_math(model, tokenizer, records, prompts.chat_prompt, settings,
                               task.task, journal)
    return {**result, "settings": {**asdict(settings), "protocol": task.protocol}}


def _records_file(path: Path) -> bool:
    """A per-problem records file evaluate() wrote (its result may have been cut off by a
    kill before it was written): JSON objects with an "id", one per line."""
    try:
        lines = path.read_text().splitlines()
        return bool(lines) and all("id" in json.loads(line) for line in lines)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def check_output(out: Path) -> None:
    """A result file and its records file beside it may replace only an earlier result's."""
    ours = json_object_with(out, RESULT_KEYS)
    refuse_foreign(out, ours, "a caprese result")
    records = out.with_suffix(".jsonl")
    named = ours and json.loads(out.read_text()).get("records_file") == records.name
    refuse_foreign(records, named or _records_file(records),
                   f"the records file of the result {out.name}")
    for path in (out, records):
        remove_stale_temporaries(path)
    BatchJournal(journal_folder(out)).check()


def journal_folder(out: Path) -> Path:
    """Where an evaluation saves its finished batches until its result is written."""
    return out.with_suffix(".partial")


def batch_journal(out: Path, variant: dict, setup: dict) -> BatchJournal:
    """The journal of an evaluation into `out`: its batches are reused only by a run of the
    same variant (an adapter's files included) on the same weights, dtype and device kind."""
    adapter = variant.get("adapter")
    folder = ready_adapters.resolve(adapter) if adapter else None
    files = sorted(folder.iterdir()) if folder and folder.is_dir() else []
    context = {"variant": {k: v for k, v in variant.items() if k != "label"},
               "adapter_files": {f.name: sha256_file(f) for f in files if f.is_file()},
               **{k: setup.get(k) for k in ("model", "weights", "dtype")},
               "device": str(setup.get("device")).split(":")[0]}
    return BatchJournal(journal_folder(out), json.dumps(context, sort_keys=True))


def load_setup(model: str, dtype: DtypeChoice, device: str, command: str) -> dict:
    """What a result records about the loaded model, the hardware (bf16 greedy answers can
    differ between CPUs, whose products round differently) and the command that ran. Call it
    once the model is loaded: a built-in model is then prepared and named by its provenance
    note rather than by a machine's cache folder."""
    return {"model": model, "weights": weights_description(model), "dtype": dtype.name,
            "dtype_reason": dtype.reason, "device": device, "machine": machine(device),
            "command": command}


def evaluate(model, tokenizer, variant: dict, task: EvalTask, out: str | Path,
             setup: dict) -> dict:
    """Run `task`, write result JSON `out` and its per-problem JSONL beside it; returns the
    result. `variant` is Variant.describe()'s record; `setup` says how the model was loaded
    (model, weights, dtype, device, command), the time and thread count are added here."""
    out = Path(out)
    check_output(out)
    journal = batch_journal(out, variant, setup)
    if journal.saved() and distributed.is_main():
        print(f"caprese: {journal.saved()} batches saved by an interrupted run in "
              f"{journal.folder}: those that match this run are reused", file=sys.stderr)
    started = time.perf_counter()
    result = run_task(model, tokenizer, task, journal)
    per_problem = out.with_suffix(".jsonl") if result["records"] else None
    record = {
        "task": task.task, "variant": variant, "summary": result["summary"],
        "settings": result["settings"], "records_file": per_problem and per_problem.name,
        "setup": {**setup, "threads": torch.get_num_threads(), "limit": task.limit,
                  "seconds": time.perf_counter() - started}}
    if distributed.world_size() > 1:
        record["setup"]["processes"] = distributed.world_size()
    if distributed.is_main():  # under torchrun every rank holds the whole result
        if per_problem:
            atomic_write_text(per_problem,
                              "".join(json.dumps(r) + "\n" for r in result["records"]))
        atomic_write_text(out, json.dumps(record, indent=2))
    distributed.barrier()  # every rank has saved its batches and read them all back
    if distributed.is_main():
        journal.remove()
    return record
