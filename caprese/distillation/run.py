"""Distill the Caprese path: layer-wise (closed form, SGD or sequential), then end-to-end.

A run directory holds everything a run writes:
    caprese_config.json, adapter.safetensors    the final adapter (caprese.load accepts it)
    stages/layerwise/, stages/e2e/               the adapter after each stage
    checkpoints/                                 resumable state and the running stage's cost
                                                 so far (removed once a stage is done)
    run.json                                     the settings, checked on --resume
    run_log.jsonl                                one line per step / layer report
    summary.json                                 time and peak memory per stage (across resumed
                                                 processes), losses
"""

from __future__ import annotations

import dataclasses
import errno
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError

from caprese import distributed
from caprese.adapter import blocks, config_of, load_weights, save
from caprese.distillation import cost
from caprese.distillation.checkpoint import remove_checkpoint
from caprese.distillation.e2e import e2e_loss
from caprese.distillation.harm import CHECK, adapter_check, drop_harmful, kept_summary
from caprese.distillation.layerwise import run_layerwise
from caprese.distillation.sequential import CHECKPOINT as SEQUENTIAL_CHECKPOINT
from caprese.distillation.sequential import check_supported, run_sequential
from caprese.distillation.settings import DistillSettings
from caprese.distillation.trainer import train
from caprese.io import atomic_write_text
from caprese.samples import Sample

CHECKPOINTS = ("stats-train", "stats-held-out", "sgd", "e2e", SEQUENTIAL_CHECKPOINT, CHECK)
RUN_FILE = "run.json"


def _is_run_record(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and {"caprese", "settings"} <= set(record)


def claim_run_dir(out: Path, resume: bool) -> None:
    """A run writes only into a new or empty folder, or into one that holds a run of its own
    (continued only with resume): it never overwrites or deletes files it did not write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: --out must name a folder for the run")
    run_file = out / RUN_FILE
    if run_file.is_file():
        if not _is_run_record(run_file):
            raise ValueError(f"{run_file} was not written by caprese distill: choose another "
                             "--out (caprese never overwrites files it did not write)")
        if not resume:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, or "
                             "choose another --out")
        return
    if out.is_dir():
        found = sorted(p.name for p in out.iterdir() if not _temporary(p))
        if found:
            raise ValueError(f"{out} holds files that no caprese run wrote "
                             f"({', '.join(found[:5])}): choose a new or empty folder (caprese "
                             "never overwrites files it did not write)")


def _temporary(path: Path) -> bool:
    """caprese.io.atomic_write's temporary files: .NAME.RANDOM.tmp (a kill can leave one)."""
    return path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp")


def start_run(out: Path, record: dict, resume: bool) -> None:
    """Claim `out` and write (or, resuming, check) its run.json; a resumed run first clears
    the temporary files a kill may have left behind. Under torchrun every rank checks and
    rank 0 writes."""
    claim_run_dir(out, resume)
    run_file = out / RUN_FILE
    resumed = run_file.is_file()
    if resumed:
        saved = json.loads(run_file.read_text())
        if saved.get("processes", 1) != record.get("processes", 1):
            raise ValueError(f"cannot resume {out} with {record.get('processes', 1)} "
                             f"process(es): it was started with {saved.get('processes', 1)}; "
                             "resume it with the same torchrun --nproc-per-node")
        saved, wanted = _identity(saved), _identity(record)
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ValueError(f"cannot resume {out}: its run used other settings ({changed})")
    distributed.barrier()  # every rank has looked at the folder before rank 0 writes in it
    if distributed.is_main():
        if resumed:
            for stale in [*out.rglob(".*.tmp"), *out.rglob("*.partial")]:
                stale.unlink(missing_ok=True)
        else:
            out.mkdir(parents=True, exist_ok=True)
            for stale in filter(_temporary, out.iterdir()):  # killed before its run.json
                stale.unlink()
            atomic_write_text(run_file, json.dumps(record, indent=2, sort_keys=True))
    distributed.barrier()


def _identity(record: dict) -> dict:
    """run.json without the checkpoint cadence: how often a run saves changes nothing it
    computes, so a resumed run may save more or less often (or predate a cadence setting)."""
    settings = {k: v for k, v in record.get("settings", {}).items()
                if k not in ("checkpoint_every", "checkpoint_minutes")}
    return {**record, "settings": settings}


def run_record(model: torch.nn.Module, settings: DistillSettings, samples: int, held_out: int,
               run_info: dict | None) -> dict:
    """What run.json holds: a resumed run must have exactly these settings."""
    record = {"caprese": json.loads(config_of(model).to_json()),
              "settings": dataclasses.asdict(settings), "samples": samples,
              "held_out": held_out, **(run_info or {})}
    record["settings"]["stages"] = list(settings.stages)
    if distributed.world_size() > 1:  # statistics shards and checkpoints depend on it
        record["processes"] = distributed.world_size()
    return record


def _disk_full(error: BaseException) -> bool:
    """safetensors reports a full disk as its own error type, so also match the text."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)


def check_solver(model: torch.nn.Module, settings: DistillSettings) -> None:
    """Refuse a model the layer-wise solver cannot fit, before anything is computed."""
    if settings.solver == "sequential" and "layerwise" in settings.stages:
        check_supported(model)


def distill(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    out: str | Path,
    settings: DistillSettings,
    held_out: Sequence[Sample] = (),
    resume: bool = False,
    pad_id: int = 0,
    run_info: dict | None = None,
) -> dict:
    """Distill L and R of a caprese-attached model; write the run directory; return summary."""
    out = Path(out)
    if not samples:
        raise ValueError("no training samples")
    check_solver(model, settings)
    start_run(out, run_record(model, settings, len(samples), len(held_out), run_info), resume)
    try:
        summary = _run_stages(model, samples, out, settings, held_out, pad_id)
        distributed.barrier()  # rank 0's files are written before any rank reads them
        return summary
    except (OSError, SafetensorError, RuntimeError) as error:
        if not _disk_full(error):
            raise
        raise RuntimeError(f"the disk holding {out} is full: free space, then run the same "
                           "command with --resume (the run continues from its last "
                           "checkpoint)") from error


def _run_stages(model, samples, out: Path, settings: DistillSettings, held_out,
                pad_id: int) -> dict:
    summary: dict = {"stages": {}}
    for stage in settings.stages:
        stage_dir = out / "stages" / stage
        if (stage_dir / "caprese_config.json").is_file():  # finished before an interruption
            load_weights(model, stage_dir)
            summary["stages"][stage] = json.loads((stage_dir / "stage.json").read_text())
            continue
        # seconds and peak memory across the processes that ran the stage; the peak is a
        # process's so far, so the stage that raised it is the one that needs the memory
        with cost.costed(out / "checkpoints", stage) as stage_cost:
            result = _run_stage(model, stage, samples, held_out, settings, out, pad_id)
            result.update(stage_cost.so_far())
        distributed.barrier()  # no rank is still reading this stage's checkpoints
        if distributed.is_main():
            save(model, stage_dir, trained={"stage": stage})
            atomic_write_text(stage_dir / "stage.json", json.dumps(result, indent=2))
            for name in CHECKPOINTS:
                remove_checkpoint(out / "checkpoints", name)
            cost.forget(out / "checkpoints")
        summary["stages"][stage] = result
    summary["peak_memory_gib"] = max([cost.peak_memory_gib()] + [
        result.get("peak_memory_gib", 0.0) for result in summary["stages"].values()])
    summary.update(_do_no_harm(summary["stages"], settings.stages))
    if distributed.is_main():
        save(model, out, trained={"stage": settings.stages[-1]})
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _run_stage(model, stage, samples, held_out, settings, out, pad_id) -> dict:
    """Fit one stage; the last one also scores the whole adapter against the method alone
    (an earlier stage's adapter is not what the user gets, and the check costs about three
    teacher passes over the held-out samples)."""
    result = _fit_stage(model, stage, samples, held_out, settings, out, pad_id)
    if held_out and stage == settings.stages[-1]:
        result["adapter_check"] = adapter_check(
            model, held_out, settings.capture_batch, pad_id, out, settings.checkpoint_every,
            settings.checkpoint_minutes)
    return result


def _do_no_harm(stages: dict, order: Sequence[str]) -> dict:
    """What the layer-wise cut kept and how the final adapter compares with the method."""
    found: dict = {}
    kept = stages.get("layerwise", {}).get("kept")
    if kept is not None:
        found["kept"] = kept
    final = stages[order[-1]].get("adapter_check")
    if final is not None:
        found["adapter_check"] = final
        found["worse_than_method"] = final["worse_than_method"]
    return found


def _fit_stage(model, stage, samples, held_out, settings, out, pad_id) -> dict:
    if stage == "layerwise":
        if settings.solver == "sequential":
            report, timings = run_sequential(model, samples, held_out, settings, out, pad_id)
            kept = drop_harmful(model, report) if held_out else []
        else:
            report, timings = run_layerwise(model, samples, held_out, settings, out, pad_id)
            kept = [row for row in report if "kept_rank" in row]
        result = {"solver": settings.solver, "timings": timings, "layers": report}
        if kept:
            result["kept"] = kept_summary(kept)
        return result
    if settings.gradient_checkpointing:
        _set_activation_checkpointing(model, True)
    try:
        subset = samples[: settings.e2e_samples] if settings.e2e_samples else samples
        loss = e2e_loss(model, settings.e2e_objective,
                        prompt_once=not settings.gradient_checkpointing)
        losses = train(model, subset, loss,
                       settings.train_settings("e2e"), out, pad_id)
    finally:
        if settings.gradient_checkpointing:
            _set_activation_checkpointing(model, False)
    return {"losses": losses, "blocks": len(blocks(model))}


def _set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """transformers renamed gradient_checkpointing_* to activation_checkpointing_* in 5.x;
    it only recomputes in training mode (the models here have no dropout to switch on)."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
    else:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        model.eval()
