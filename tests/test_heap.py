"""Freed CPU memory goes back to the system after a step (glibc keeps it otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from caprese import heap

# A process that frees most of 100 blocks of 4-12 MB, the way a step's activations go, with
# one block kept every ten so the heap's top cannot shrink by itself; it prints its resident
# memory before and after heap.release().
FRAGMENTED = """
import torch
from caprese import heap

def resident() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096

large = torch.empty(20 << 20, dtype=torch.uint8)
del large  # freeing it raises glibc's mmap threshold past 12 MB
blocks = [torch.ones(1_000_000 + 20_000 * i) for i in range(100)]
kept = blocks[::10]
del blocks
before = resident()
released = heap.release()
print(before, resident(), released)
"""


@pytest.mark.skipif(heap._malloc_trim() is None, reason="malloc_trim is glibc's")
def test_release_hands_freed_heap_pages_back():
    output = subprocess.run([sys.executable, "-c", FRAGMENTED], check=True,
                            capture_output=True, text=True).stdout.split()
    before, after, released = int(output[0]), int(output[1]), output[2] == "True"
    assert released
    assert before - after > 400 << 20, (before, after)  # 0.72 GB freed, 0.08 GB kept


@pytest.mark.skipif(heap._malloc_trim() is None, reason="malloc_trim is glibc's")
def test_the_environment_can_keep_the_heap():
    """CAPRESE_HEAP_RELEASE=0: the freed blocks stay resident (faster steps, more memory)."""
    environment = {**os.environ, heap.ENVIRONMENT: "0"}
    output = subprocess.run([sys.executable, "-c", FRAGMENTED], check=True, env=environment,
                            capture_output=True, text=True).stdout.split()
    before, after, released = int(output[0]), int(output[1]), output[2] == "True"
    assert not released
    assert abs(before - after) < 50 << 20, (before, after)


def test_every_step_of_a_distillation_hands_its_heap_back(tmp_path, monkeypatch):
    """Each statistics batch, E2E micro-batch and held-out check batch ends with a release."""
    from conftest import tiny_model
    from distill_job import tiny_samples

    import caprese
    from caprese.distillation import DistillSettings, distill

    calls = []
    monkeypatch.setattr(heap, "release", lambda: calls.append(1) or True)
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    settings = DistillSettings(stages=("layerwise", "e2e"), capture_batch=4, e2e_epochs=1,
                               e2e_batch=4, micro_batch=2)
    distill(model, tiny_samples(16), tmp_path, settings, held_out=tiny_samples(4, seed=1))
    # statistics: 4 training + 1 held-out batch; E2E: 4 steps of 2 micro-batches; the check: 1
    assert len(calls) == 4 + 1 + 4 * 2 + 1
