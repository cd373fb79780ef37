"""The main job end to end on the smallest built-in model, with tiny sizes."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from caprese.pipeline import Preset, run_pipeline  # noqa: E402

pytestmark = pytest.mark.slow


def test_pipeline_distills_evaluates_and_reports(tmp_path, capsys):
    preset = Preset("smollm2-135m-instruct", samples=8, held_out=4, max_length=128, e2e_samples=4,
                    e2e_epochs=1, math_problems=2, max_new_tokens=16, xsum_articles=2,
                    fidelity_samples=2, language_samples=1, math_batch=2)
    # fp32: bf16 backward and prefill run in software on CPUs without AVX512_BF16 (20 min
    # instead of 3 on an AVX2 EPYC); the dtype is passed on to every step
    report = run_pipeline(preset, tmp_path, dtype="fp32")
    text = report.read_text()
    for label in ("| full |", "| griffin 0.5 |", "| Caprese layerwise (griffin) |",
                  "| Caprese e2e (cats) |"):
        assert label in text
    assert (tmp_path / "report_accuracy.png").is_file()
    assert (tmp_path / "report_layer_errors.png").is_file()
    result = json.loads((tmp_path / "results" / "gsm-symbolic-test-cats-e2e.json").read_text())
    assert result["summary"]["problems"] == 2
    assert (result["setup"]["model"], result["setup"]["dtype"]) == ("smollm2-135m-instruct",
                                                                    "fp32")
    assert (result["variant"]["kind"], result["variant"]["method"]) == ("e2e", "cats")
    records = (tmp_path / "results" / "gsm-symbolic-test-cats-e2e.jsonl").read_text().splitlines()
    assert len(records) == 2 and "prompt" in json.loads(records[0])
    # the default recipe: the model's own text (one cache for both methods) + general text
    assert len((tmp_path / "teacher_text.jsonl").read_text().splitlines()) == 6 + 3
    summary = json.loads((tmp_path / "adapter-cats" / "summary.json").read_text())
    assert {"math", "general"} <= set(summary["adapter_check"])
    run = json.loads((tmp_path / "adapter-griffin" / "run.json").read_text())
    assert (run["continuations"], run["general_share"]) == ("teacher", 0.25)

    capsys.readouterr()
    run_pipeline(preset, tmp_path, dtype="fp32")  # everything exists: every step is skipped
    assert capsys.readouterr().out.count("exists: skipping") == 2 + 7 * 4 - 2
