"""A stage's seconds and peak memory add up across the processes of a killed, resumed run."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from distill_job import tiny_samples

import caprese
from caprese.distillation import DistillSettings, distill
from caprese.distillation import run as run_module
from caprese.distillation.cost import COST_FILE, StageCost


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [0.0]
    monkeypatch.setattr(StageCost, "clock", staticmethod(lambda: now[0]))
    return now


def test_a_resumed_stage_counts_the_work_kept_once(tmp_path, monkeypatch, clock):
    """Four E2E steps of 100 s, killed in the third after two checkpoints: the stage costs
    400 s (the third step's lost try is not counted) and its peak is the highest process's."""
    settings = DistillSettings(stages=("layerwise", "e2e"), e2e_epochs=1, e2e_batch=4,
                               micro_batch=4, checkpoint_every=1)
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="griffin", rank=4))
    real_loss, calls = run_module.e2e_loss, []

    def a_step_takes_100_s(*args, **kwargs):
        loss = real_loss(*args, **kwargs)

        def step(*step_args):
            clock[0] += 100.0
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return loss(*step_args)
        return step

    monkeypatch.setattr(run_module, "e2e_loss", a_step_takes_100_s)
    with pytest.raises(KeyboardInterrupt):
        distill(model, tiny_samples(16), tmp_path, settings)
    ledger_file = tmp_path / "checkpoints" / COST_FILE
    ledger = json.loads(ledger_file.read_text())
    assert ledger["stage"] == "e2e" and ledger["seconds"] == 200.0
    ledger["peak_memory_gib"] = 999.0  # as if the killed process had needed more memory
    ledger_file.write_text(json.dumps(ledger))

    summary = distill(model, tiny_samples(16), tmp_path, settings, resume=True)
    e2e, layerwise = summary["stages"]["e2e"], summary["stages"]["layerwise"]
    assert e2e["seconds"] == 400.0 and e2e["resumed"]
    assert e2e["peak_memory_gib"] == 999.0 and summary["peak_memory_gib"] == 999.0
    assert layerwise["seconds"] == 0.0 and not layerwise["resumed"]  # no step in it
    assert 0 < layerwise["peak_memory_gib"] < 999.0
    assert not ledger_file.exists()  # a finished stage's cost lives in its stage.json
    assert json.loads((tmp_path / "stages" / "e2e" / "stage.json").read_text())["seconds"] == 400


def test_a_leftover_or_damaged_record_adds_nothing(tmp_path, clock):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / COST_FILE).write_text(json.dumps({"stage": "layerwise", "seconds": 50.0,
                                                     "peak_memory_gib": 999.0}))
    clock[0] = 10.0
    other = StageCost(checkpoints, "e2e")
    clock[0] = 15.0
    assert other.so_far()["seconds"] == 5.0 and not other.so_far()["resumed"]
    assert other.so_far()["peak_memory_gib"] < 999.0
    (checkpoints / COST_FILE).write_text("{not json")
    assert StageCost(checkpoints, "layerwise").so_far()["seconds"] == 0.0
