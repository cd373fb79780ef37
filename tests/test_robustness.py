"""Hostile input against every command and loader (docs/ROBUSTNESS.md is the catalogue):
nothing lost, nothing hangs, every bad input gets a clear, specific error."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import prompt_ids, tiny_model
from helpers import attached_copy, randomize_lowrank

import caprese
from caprese.cli import main
from caprese.data import CapreseDataError, load
from caprese.evaluate.checker import BoundedChecker, check
from caprese.extract import last_boxed


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# 1. nothing lost ------------------------------------------------------------------------
def test_distill_never_overwrites_files_it_did_not_write(tmp_path, tiny_dir, capsys):
    out = tmp_path / "mine"
    (out / "stages" / "e2e").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    for name in ("adapter.safetensors", "caprese_config.json", "summary.json",
                 "stages/e2e/stage.json", "checkpoints/e2e.json"):
        (out / name).write_text(f"the user's own {name}")
    before = snapshot(out)
    assert main(["distill", "--model", str(tiny_dir), "--method", "cats", "--rank", "4",
                 "--samples", "4", "--held-out", "0", "--out", str(out)]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert snapshot(out) == before  # nothing written, nothing deleted
    (out / "run.json").write_text('{"mine": true}')  # a run.json caprese did not write
    assert main(["distill", "--model", str(tiny_dir), "--out", str(out), "--resume"]) == 2
    assert "not written by caprese" in capsys.readouterr().err


def test_save_never_overwrites_a_foreign_adapter_file(tmp_path):
    model = attached_copy(tiny_model("llama"), method="griffin", rank=4)
    (tmp_path / "adapter.safetensors").write_bytes(b"someone else's weights")
    with pytest.raises(caprese.AdapterError, match="not written by caprese"):
        caprese.save(model, tmp_path)
    assert (tmp_path / "adapter.safetensors").read_bytes() == b"someone else's weights"
    caprese.save(model, tmp_path / "ok")
    caprese.save(model, tmp_path / "ok")  # its own adapter: replaced


@pytest.mark.parametrize("command", [["eval", "--task", "gsm-symbolic", "--limit", "1"],
                                     ["bench", "--gen-len", "2"],
                                     ["report", "RESULT"]])
def test_outputs_never_replace_files_caprese_did_not_write(tmp_path, tiny_dir, capsys, command):
    out = tmp_path / "notes.json"
    out.write_text("my notes")
    if command[0] == "report":  # a valid result to report on, and a foreign report file
        result = tmp_path / "result.json"
        result.write_text(json.dumps({"task": "xsum", "variant": {"label": "full"},
                                      "summary": {"rougeL": 1.0}}))
        out = tmp_path / "notes.md"
        out.write_text("my notes")
        command = ["report", str(result), "--out", str(out)]
    else:
        command = [*command, "--model", str(tiny_dir), "--out", str(out)]
    assert main(command) == 2
    assert "caprese never overwrites" in capsys.readouterr().err
    assert out.read_text() == "my notes"


def test_written_files_are_readable_like_any_new_file(tmp_path):
    """Atomic writes go through mkstemp (owner-only): the result gets the usual mode."""
    model = attached_copy(tiny_model("llama"), method="griffin", rank=4)
    caprese.save(model, tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter.safetensors", "caprese_config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask


def test_a_full_disk_during_distill_says_what_to_do_and_the_rerun_resumes(tmp_path, monkeypatch):
    from caprese.distillation import DistillSettings, distill
    from caprese.distillation import checkpoint as checkpoint_module
    from tests.distill_job import tiny_samples

    settings = DistillSettings(stages=("layerwise", "e2e"), e2e_epochs=1, e2e_batch=8,
                               checkpoint_every=1)
    model = attached_copy(tiny_model("qwen2"), method="cats", density=0.5, rank=4)
    real_save = checkpoint_module.save_file
    calls = []

    def full_disk(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(RuntimeError, match="full.*--resume"):
        distill(model, tiny_samples(16), tmp_path / "run", settings)
    summary = distill(model, tiny_samples(16), tmp_path / "run", settings, resume=True)
    assert set(summary["stages"]) == {"layerwise", "e2e"}
    assert not list((tmp_path / "run").rglob(".*.tmp"))


# 2. nothing hangs ------------------------------------------------------------------------
def test_a_hostile_answer_is_refused_at_once():
    started = time.perf_counter()
    verdict = check(r"\boxed{10^{10^{10^{10}}}}", "1")
    assert verdict.reason.startswith("refused") and not verdict.correct
    assert time.perf_counter() - started < 1.0


def slow_compare(gold: str, response: str) -> tuple[str, bool]:
    if "slow" in response:
        time.sleep(60)
    return response, response == gold


def test_the_checker_bound_holds_and_leaves_nothing_behind():
    checker = BoundedChecker(compare=slow_compare)
    threads = threading.active_count()
    try:
        for _ in range(3):
            started = time.perf_counter()
            assert check("slow", "1", timeout=0.5, checker=checker).reason == "timeout"
            assert time.perf_counter() - started < 5.0  # the bound, plus a worker's start
        assert check("1", "1", checker=checker).correct  # a fresh worker took over
        assert threading.active_count() == threads  # no thread per timeout piles up
    finally:
        checker.close()


# 3. crashes on model output and task files ------------------------------------------------
def test_a_brace_less_boxed_answer_is_read_and_checked():
    assert last_boxed(r"answer \boxed $5$") == "5"
    assert last_boxed("\\boxed") is None and last_boxed("\\boxed $$") is None
    verdict = check(r"answer \boxed $5$", "5")
    assert verdict.correct and verdict.reason == ""


@pytest.mark.parametrize("content, message", [
    (b'{"solution": "\\\\boxed{1}"}\n', r"line 1: no 'problem' field"),
    (b'{"problem": "a", "answer": "1"}\n[1, 2]\n', r"line 2: expected a JSON object"),
    (b'{"problem": "a", "answer": "1"}\n{"problem": oops}\n', r"line 2: not valid JSON"),
    ('{"problem": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"), "not UTF-8"),
])
def test_bad_task_files_name_the_file_line_and_problem(tmp_path, content, message):
    path = tmp_path / "task.jsonl"
    path.write_bytes(content)
    with pytest.raises(CapreseDataError, match=message) as error:
        load("math", path)
    assert str(path) in str(error.value)


def test_a_task_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"problem": "What is 1+1?", "answer": "2"}\n')
    assert load("math", path)[0].answer == "2"


def test_a_missing_task_file_is_not_sent_to_the_hub(tmp_path, tiny_dir, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--task", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "no such file" in capsys.readouterr().err


# 4. adapters that load silently but are wrong ---------------------------------------------
def saved_adapter(tmp_path: Path) -> Path:
    model = attached_copy(tiny_model("llama"), method="griffin", rank=4)
    randomize_lowrank(model)
    return caprese.save(model, tmp_path / "adapter")


def rewrite_tensor(folder: Path, key: str, value: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    from caprese.io import sha256_file

    tensors = load_file(folder / "adapter.safetensors")
    tensors[key] = value
    save_file(tensors, folder / "adapter.safetensors", metadata={"format": "caprese"})
    record = json.loads((folder / "caprese_config.json").read_text())
    record["weights_sha256"] = sha256_file(folder / "adapter.safetensors")
    (folder / "caprese_config.json").write_text(json.dumps(record))


@pytest.mark.parametrize("bad, message", [
    (lambda t: t.clone().fill_(float("nan")), "NaN"),
    (lambda t: t.to(torch.int32), "int32"),
    (lambda t: t > 0, "bool"),
])
def test_broken_adapter_tensors_are_refused(tmp_path, bad, message):
    folder = saved_adapter(tmp_path)
    from safetensors.torch import load_file

    rewrite_tensor(folder, "layers.0.L", bad(load_file(folder / "adapter.safetensors")
                                             ["layers.0.L"]))
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(caprese.AdapterError, match=message):
        caprese.load(model, folder)
    assert not hasattr(model, "_caprese")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field, value", [("rank", None), ("rank", True), ("rank", "256"),
                                          ("density", "0.5"), ("density", None),
                                          ("method", 3), ("layers", [0, "1"]), ("layers", []),
                                          ("seed", 1.5), ("init", None), ("fingerprint", [])])
def test_config_values_of_the_wrong_type_are_adapter_errors(tmp_path, field, value):
    folder = saved_adapter(tmp_path)
    record = json.loads((folder / "caprese_config.json").read_text())
    record[field] = value
    (folder / "caprese_config.json").write_text(json.dumps(record))
    model = tiny_model("llama")
    with pytest.raises(caprese.AdapterError):
        caprese.load(model, folder)
    assert not hasattr(model, "_caprese")


# 5. silent wrong results -------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["eval", "--task", "gsm-symbolic", "--limit", "-1"], "--limit: must be at least 1"),
    (["eval", "--task", "gsm-symbolic", "--limit", "0"], "--limit: must be at least 1"),
    (["distill", "--samples", "0"], "--samples: must be at least 1"),
    (["distill", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["distill", "--density", "1.5"], "--density: must be in (0, 1]"),
    (["distill", "--general-share", "1"], "--general-share: must be in [0, 1)"),
    (["distill", "--general-share", "-0.1"], "--general-share: must be in [0, 1)"),
])
def test_numbers_out_of_range_are_refused_by_name(tmp_path, tiny_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--model", str(tiny_dir), "--out", str(tmp_path / "out")])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_an_empty_task_file_is_an_error_not_an_empty_result(tmp_path, tiny_dir, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["eval", "--model", str(tiny_dir), "--task", str(tmp_path / "empty.jsonl"),
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "holds no problems" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# 6. smaller ones ------------------------------------------------------------------------
def test_info_on_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_lm_eval_names_an_unknown_task(tmp_path, tiny_dir, capsys):
    pytest.importorskip("lm_eval")
    assert main(["lm-eval", "--model", str(tiny_dir), "--tasks", "bogus_task_name",
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "no task bogus_task_name" in capsys.readouterr().err


def test_beam_search_is_refused():
    model = attached_copy(tiny_model("llama"), method="griffin", rank=4)
    ids = prompt_ids()
    with pytest.raises(ValueError, match="beam search"), torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=2, max_new_tokens=2,
                       pad_token_id=0)


# property tests ------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=8)
FIELDS = ("method", "density", "rank", "layers", "init", "seed", "fingerprint",
          "weights_sha256", "format", "caprese_version", "trained")


@pytest.fixture(scope="module")
def adapter_and_model(tmp_path_factory):
    folder = saved_adapter(tmp_path_factory.mktemp("property"))
    model = tiny_model("llama")
    return folder, model, {k: v.clone() for k, v in model.state_dict().items()}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON)
def test_any_json_value_in_any_config_field_loads_or_is_an_adapter_error(
        adapter_and_model, tmp_path_factory, field, value):
    folder, model, state = adapter_and_model
    record = json.loads((folder / "caprese_config.json").read_text())
    record[field] = value
    changed = tmp_path_factory.mktemp("changed")
    (changed / "adapter.safetensors").write_bytes((folder / "adapter.safetensors").read_bytes())
    (changed / "caprese_config.json").write_text(json.dumps(record))
    try:
        caprese.load(model, changed)
    except caprese.AdapterError:
        assert not hasattr(model, "_caprese")
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    else:  # a valid value: the config says it
        config = caprese.config_of(model)
        if hasattr(config, field):
            assert getattr(config, field) == value or field in ("density", "layers")
        caprese.detach(model)


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(
    list("\\{}$^_0123456789boxedfrac .,-")), max_size=120))
def test_random_text_never_crashes_the_answer_extraction(text):
    from caprese.extract import last_number

    for found in (last_boxed(text), last_number(text)):
        assert found is None or isinstance(found, str)


CHECK_TIMES: list[float] = []


@settings(max_examples=60, deadline=None)
@given(answer=st.text(alphabet=list("\\{}^_0123456789xy+-*/()! frac sqrt boxed"), max_size=60),
       gold=st.sampled_from(["1", "10", "\\frac{1}{2}", "x^2", "2^{10}"]))
def test_check_returns_within_its_bound_on_random_answers(answer, gold):
    started = time.perf_counter()
    verdict = check(f"so the answer is \\boxed{{{answer}}}", gold, timeout=5.0)
    CHECK_TIMES.append(time.perf_counter() - started)
    assert isinstance(verdict.correct, bool) and CHECK_TIMES[-1] < 5.0 + 3.0
    if len(CHECK_TIMES) % 20 == 0:
        print(f"worst check time over {len(CHECK_TIMES)} answers: {max(CHECK_TIMES):.3f} s")
