"""torch.distributed on 2 CPU processes (gloo), started by torchrun from the tests: the same
adapters, records and teacher text as one process, a lost rank stops the group, and the
run resumes to the same adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from helpers import word_tokenizer
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "dist_job.py"



def caprese(argv: list[str], processes: int = 1, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """`caprese ARGV`, alone or under `torchrun --nproc-per-node PROCESSES` (gloo)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": str(ROOT), **(env or {})}
    program = [str(JOB)] if "KILL_RANK" in (env or {}) else ["-m", "caprese"]
    if processes == 1:
        command = [sys.executable, *program, *argv]
    else:  # what a user types: torchrun --standalone --nproc-per-node N -m caprese ...
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", *program, *argv]
    done = subprocess.run(command, env=environment, capture_output=True, text=True,
                          timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stderr[-3000:]}")
    return done


def products(folder: Path) -> dict[str, torch.Tensor]:
    """L R of every layer (the map the path applies; L and R alone have a sign freedom)."""
    tensors = load_file(folder / "adapter.safetensors")
    layers = sorted({key.split(".")[1] for key in tensors})
    return {i: tensors[f"layers.{i}.L"].double() @ tensors[f"layers.{i}.R"].double()
            for i in layers}


def distill_args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--model", str(tiny_dir), "--method", "cats", "--rank", "4",
            "--data", "gsm8k", "--samples", "24", "--held-out", "4", "--max-length", "160",
            "--batch-size", "4", "--out", str(out), *extra]


def test_closed_form_and_e2e_from_two_processes_equal_one(tmp_path, tiny_dir):
    extra = ("--stages", "layerwise,e2e", "--e2e-batch", "8", "--micro-batch", "2",
             "--e2e-epochs", "1", "--e2e-lr", "1e-3")
    caprese(distill_args(tiny_dir, tmp_path / "one", *extra))
    caprese(distill_args(tiny_dir, tmp_path / "two", *extra), processes=2)
    for stage in ("stages/layerwise", ""):  # float64 statistics: only the order of sums
        one, two = products(tmp_path / "one" / stage), products(tmp_path / "two" / stage)
        for layer in one:
            torch.testing.assert_close(two[layer], one[layer], rtol=1e-5, atol=1e-7)
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["processes"] == 2
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "two" / "run_log.jsonl").read_text().splitlines() if '"step"' in line]
    ones = [json.loads(line)["loss"] for line in
            (tmp_path / "one" / "run_log.jsonl").read_text().splitlines() if '"step"' in line]
    assert len(losses) == len(ones) == 3  # 24 samples, global batch 8, whatever N
    assert losses == pytest.approx(ones, rel=1e-5)


def test_eval_and_teacher_text_records_equal_one_process(tmp_path, tiny_dir):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"problem": f"t{i} t{i + 3} t{i + 7}", "answer": str(i)})
                            + "\n" for i in range(4, 17)))
    argv = ["eval", "--model", str(tiny_dir), "--method", "griffin", "--task", str(task),
            "--max-new-tokens", "6", "--batch-size", "3"]
    caprese([*argv, "--out", str(tmp_path / "one.json")])
    caprese([*argv, "--out", str(tmp_path / "two.json")], processes=2)
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["summary"] == one["summary"] and two["setup"]["processes"] == 2
    for name, processes in (("one", 1), ("two", 2)):
        caprese(distill_args(tiny_dir, tmp_path / f"teacher-{name}", "--stages", "layerwise",
                             "--continuations", "teacher", "--generation-batch", "3"),
                processes=processes)

    def cache(name: str) -> dict:
        lines = (tmp_path / f"teacher-{name}" / "teacher_text.jsonl").read_text().splitlines()
        return {json.loads(line)["key"]: json.loads(line)["ids"] for line in lines}

    # the math samples only (18 + 3 of 24 + 4): the general-text quarter is real text already
    assert cache("two") == cache("one") and len(cache("one")) == 21


def test_a_lost_rank_stops_the_group_and_the_run_resumes_to_the_same_adapter(tmp_path,
                                                                             tiny_dir):
    extra = ("--stages", "layerwise,e2e", "--e2e-batch", "4", "--micro-batch", "2",
             "--e2e-epochs", "2", "--checkpoint-every", "1")
    caprese(distill_args(tiny_dir, tmp_path / "straight", *extra), processes=2)
    killed = tmp_path / "killed"
    done = caprese(distill_args(tiny_dir, killed, *extra), processes=2, check=False,
                   env={"KILL_RANK": "1", "KILL_AT": "5"})
    assert done.returncode != 0
    assert "rank" in done.stderr and ("Signal 9" in done.stderr or "SIGKILL" in done.stderr
                                      or "exitcode" in done.stderr)
    assert not (killed / "adapter.safetensors").exists()
    other = caprese(distill_args(tiny_dir, killed, *extra, "--resume"), check=False)
    assert other.returncode == 2 and "started with 2" in other.stderr  # another N: refused
    caprese(distill_args(tiny_dir, killed, *extra, "--resume"), processes=2)
    assert (killed / "adapter.safetensors").read_bytes() == \
        (tmp_path / "straight" / "adapter.safetensors").read_bytes()


def test_the_main_job_runs_on_two_processes(tmp_path):
    model = tmp_path / "model"  # wide enough for the main job's rank 256, two layers
    tiny_model("llama", hidden_size=272, intermediate_size=544, num_hidden_layers=2
               ).save_pretrained(model)
    word_tokenizer().save_pretrained(model)
    done = caprese(["pipeline", "--quick", "--model", str(model), "--dtype", "fp32",
                    "--out", str(tmp_path / "run")], processes=2)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| Caprese e2e (cats) |" in report and "| full |" in report
    assert done.stdout.count("[pipeline] done") == 1  # rank 0 alone speaks


def test_the_sequential_solver_on_two_processes_equals_one(tmp_path, tiny_dir):
    extra = ("--stages", "layerwise", "--solver", "sequential")
    caprese(distill_args(tiny_dir, tmp_path / "one", *extra))
    caprese(distill_args(tiny_dir, tmp_path / "two", *extra), processes=2)
    one, two = products(tmp_path / "one"), products(tmp_path / "two")
    for layer in one:
        torch.testing.assert_close(two[layer], one[layer], rtol=1e-5, atol=1e-7)
    assert not (tmp_path / "two" / "checkpoints" / "streams").exists()
