"""What a stage costs (seconds, peak memory) when a run is killed and resumed, maybe several times.

A process knows only its own clock and peak. So while a stage runs, every checkpoint also
writes the stage's cost so far into `checkpoints/stage_cost.json`, and a process that resumes
the stage starts from it. The stage's seconds are then the time of the work it kept (work
done after the last checkpoint is redone, and counted once, by the process that redoes it),
and its peak is the highest of every process that ran it.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from caprese import distributed
from caprese.io import atomic_write_text

COST_FILE = "stage_cost.json"


def peak_memory_gib() -> float:
    """This process's peak: CUDA memory on a GPU, else the resident set (ru_maxrss)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StageCost:
    """One stage's cost so far, across the processes that ran it."""

    clock = staticmethod(time.perf_counter)  # tests substitute a clock they control

    def __init__(self, checkpoints: Path, stage: str) -> None:
        self.file, self.stage = checkpoints / COST_FILE, stage
        self.started = self.clock()
        earlier = _read(self.file)
        if earlier.get("stage") != stage:  # none yet, or a finished stage's leftover
            earlier = {}
        self.earlier_s = float(earlier.get("seconds", 0.0))
        self.earlier_peak = float(earlier.get("peak_memory_gib", 0.0))
        self.resumed = bool(earlier)

    def so_far(self) -> dict:
        return {"seconds": self.earlier_s + self.clock() - self.started,
                "peak_memory_gib": max(self.earlier_peak, peak_memory_gib()),
                "resumed": self.resumed}

    def record(self) -> None:
        if distributed.is_main():
            atomic_write_text(self.file, json.dumps({"stage": self.stage, **self.so_far()}))


def _read(path: Path) -> dict:
    """The recorded cost, or nothing: a damaged record loses only the earlier time."""
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


_running: StageCost | None = None


@contextmanager
def costed(checkpoints: Path, stage: str) -> Iterator[StageCost]:
    """Count a stage's cost; while it runs, a checkpoint saved into `checkpoints` records it."""
    global _running
    _running = StageCost(checkpoints, stage)
    try:
        yield _running
    finally:
        _running = None


def note_checkpoint(directory: Path) -> None:
    """Called by every checkpoint save: the running stage's cost is as durable as its work."""
    if _running is not None and _running.file.parent == directory:
        _running.record()


def forget(checkpoints: Path) -> None:
    """The stage is done and its cost is in its stage.json."""
    (checkpoints / COST_FILE).unlink(missing_ok=True)
