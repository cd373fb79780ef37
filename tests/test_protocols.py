"""The thinking protocol: sampling preset, answers after </think>, runs' spread, pass@k plot."""

from __future__ import annotations

import json

import pytest

from caprese.cli import main
from caprese.evaluate.math import summarize
from caprese.evaluate.protocols import final_answer
from caprese.evaluate.report import build_report
from caprese.evaluate.tasks import EvalTask


@pytest.mark.parametrize("prompt, output, expected", [
    ("Q?", "The answer is \\boxed{4}.", ("The answer is \\boxed{4}.", True)),
    ("Q?", "<think>2+2 is \\boxed{5}? no</think>So \\boxed{4}", ("So \\boxed{4}", True)),
    ("Q?<think>\n", "2+2... \\boxed{5}? wait</think>\\boxed{4}", ("\\boxed{4}", True)),
    ("Q?", "</think>one</think>two", ("two", True)),  # the last closing tag
    ("Q?<think>\n", "2+2 is \\boxed{4} but let me check", ("", False)),  # cut off thinking
    ("Q?", "<think>so \\boxed{4}", ("", False)),
])
def test_the_answer_is_taken_after_the_reasoning(prompt, output, expected):
    assert final_answer(prompt, output) == expected


def test_the_thinking_preset_and_its_overrides():
    greedy = EvalTask("math500")
    assert (greedy.temperature, greedy.top_p, greedy.samples, greedy.max_new_tokens) == \
        (0.0, 1.0, 1, 512)
    thinking = EvalTask("math500", protocol="thinking")
    assert (thinking.temperature, thinking.top_p, thinking.samples, thinking.max_new_tokens) \
        == (0.6, 0.95, 4, 32768)
    mine = EvalTask("math500", protocol="thinking", samples=8, max_new_tokens=64,
                    temperature=0.0)
    assert (mine.temperature, mine.top_p, mine.samples, mine.max_new_tokens) == \
        (0.0, 0.95, 8, 64)
    with pytest.raises(ValueError, match="unknown protocol 'chat'; choose one of greedy, "
                                         "thinking"):
        EvalTask("math500", protocol="chat")


def row(correct: list[bool], unfinished: list[bool] | None = None) -> dict:
    found = {"level": None, "correct": correct, "tokens": [10] * len(correct),
             "truncated": [False] * len(correct)}
    if unfinished is not None:
        found["unfinished_reasoning"] = unfinished
    return found


def test_runs_give_a_mean_a_spread_and_pass_at_k():
    rows = [row([True, True, False, True]), row([False, False, False, True], [True] * 3 + [False]),
            row([True, False, False, False])]
    summary = summarize(rows, samples=4)
    assert summary["run_accuracies"] == pytest.approx([2 / 3, 1 / 3, 0, 2 / 3])
    assert summary["mean_accuracy"] == pytest.approx(5 / 12)
    assert summary["accuracy_std"] == pytest.approx(0.31914236, rel=1e-6)  # sample std
    assert summary["pass_at_k"]["1"] == pytest.approx(summary["mean_accuracy"])
    assert summary["pass_at_k"]["4"] == 1.0
    assert set(summary["pass_at_k"]) == {"1", "2", "4"}
    assert summary["unfinished_reasoning_rate"] == pytest.approx(3 / 12)
    three = summarize([row([True, False, False])], samples=3)
    assert set(three["pass_at_k"]) == {"1", "2", "3"}  # the largest k is always there


def test_eval_runs_the_thinking_protocol_and_the_report_plots_coverage(tmp_path, tiny_dir):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"problem": f"t{i} t{i + 1}", "answer": str(i)}) + "\n"
                            for i in range(4, 9)))
    out = tmp_path / "thinking.json"
    assert main(["eval", "--model", str(tiny_dir), "--task", str(task), "--protocol",
                 "thinking", "--max-new-tokens", "6", "--samples", "3", "--batch-size", "2",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    settings, summary = result["settings"], result["summary"]
    assert settings["protocol"] == "thinking"
    assert (settings["temperature"], settings["top_p"], settings["samples"],
            settings["max_new_tokens"]) == (0.6, 0.95, 3, 6)
    assert len(summary["run_accuracies"]) == 3 and "accuracy_std" in summary
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(len(r["outputs"]) == 3 for r in records)
    report = build_report([out], tmp_path / "report.md")
    text = report.read_text()
    assert "(3 runs)" in text and "mean acc % ± std over runs" in text
    assert "![Coverage: pass@k](report_pass_at_k.png)" in text
    assert (tmp_path / "report_pass_at_k.png").stat().st_size > 0
