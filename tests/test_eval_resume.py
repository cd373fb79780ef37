"""A killed evaluation resumes from its saved batches and gives what an unbroken run gives."""

from __future__ import annotations

import json

import pytest

from caprese import generation
from caprese.cli import main

GENERATE_BATCH = generation._generate_batch


class Killed(Exception):
    """Stands in for a kill in the middle of an evaluation."""


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"problem": f"t{i} t{i + 1} t{i + 2}"[: 4 + 3 * (i % 4)],
                                        "answer": str(i)}) + "\n" for i in range(4, 11)))
    return path


def _eval(tiny_dir, task, out, *extra):
    return main(["eval", "--model", str(tiny_dir), "--task", str(task), "--batch-size", "2",
                 "--max-new-tokens", "4", "--out", str(out), *extra])


def _counting(monkeypatch, kill_after: int | None = None) -> list[int]:
    """Count generated batches; raise Killed once `kill_after` batches have been generated."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        if kill_after is not None and len(calls) == kill_after:
            raise Killed
        calls.append(1)
        return GENERATE_BATCH(*args, **kwargs)

    monkeypatch.setattr(generation, "_generate_batch", counted)
    return calls


def _records(out):
    return [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", [
    ["--method", "griffin", "--density", "0.5"],
    ["--method", "cats", "--protocol", "thinking", "--samples", "2", "--max-new-tokens", "4"],
])
def test_a_killed_eval_resumes_and_equals_an_unbroken_run(tmp_path, tiny_dir, task,
                                                           monkeypatch, variant):
    unbroken = tmp_path / "unbroken.json"
    calls = _counting(monkeypatch)
    assert _eval(tiny_dir, task, unbroken, *variant) == 0
    assert len(calls) == 4  # 7 problems, batches of 2
    assert not (tmp_path / "unbroken.partial").exists()  # removed once the result is written

    out = tmp_path / "resumed.json"
    _counting(monkeypatch, kill_after=3)
    with pytest.raises(Killed):
        _eval(tiny_dir, task, out, *variant)
    assert not out.exists()
    assert len(list((tmp_path / "resumed.partial").glob("batch-*.json"))) == 3
    calls = _counting(monkeypatch)
    assert _eval(tiny_dir, task, out, *variant) == 0
    assert len(calls) == 1  # only the batch the kill lost
    assert _records(out) == _records(unbroken)
    assert json.loads(out.read_text())["summary"] == json.loads(unbroken.read_text())["summary"]
    assert not (tmp_path / "resumed.partial").exists()


def test_saved_batches_of_another_variant_or_a_torn_file_are_generated_again(
        tmp_path, tiny_dir, task, monkeypatch):
    out = tmp_path / "result.json"
    griffin = ("--method", "griffin", "--density", "0.5")
    _counting(monkeypatch, kill_after=3)
    with pytest.raises(Killed):
        _eval(tiny_dir, task, out, *griffin)
    calls = _counting(monkeypatch)
    assert _eval(tiny_dir, task, out, "--method", "griffin", "--density", "0.25") == 0
    assert len(calls) == 4  # another density decodes other tokens: nothing reused

    _counting(monkeypatch, kill_after=3)
    with pytest.raises(Killed):
        _eval(tiny_dir, task, out, *griffin)
    saved = sorted((tmp_path / "result.partial").glob("batch-*.json"))
    saved[0].write_text(saved[0].read_text()[:20])  # torn by a kill
    calls = _counting(monkeypatch)
    assert _eval(tiny_dir, task, out, *griffin) == 0
    assert len(calls) == 2  # the torn batch and the one never generated


def test_a_folder_caprese_did_not_write_is_refused_and_left_alone(tmp_path, tiny_dir, task):
    folder = tmp_path / "result.partial"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert _eval(tiny_dir, task, tmp_path / "result.json") == 2
    assert (folder / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "result.json").exists()
