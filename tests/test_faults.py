"""Fault injection: `caprese eval` and `caprese distill` SIGKILLed at seeded points.

tests/fault_job.py runs the command with os.replace wrapped so that the k-th commit of a
file (k drawn from the seed, printed) kills the process just before it renames the finished
temporary file into place: the worst moment for atomicity. Then every file on disk must be
complete (JSON parses, safetensors load) or absent, and the rerun of the same command must
end with the same results as a run that was never killed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SEEDS = (0, 1, 2)
JOB = Path(__file__).resolve().parent / "fault_job.py"



def run(argv: list[str], tmp_path: Path, kill_at: int = 0) -> tuple[int, int]:
    """(exit code, number of file commits) of `caprese ARGV` in a fresh process."""
    count = tmp_path / f"commits-{kill_at}-{random.random()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(JOB), str(kill_at), str(count), *argv], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(done.stderr[-2000:])
    return done.returncode, int(count.read_text()) if count.is_file() else -1


def assert_complete(folder: Path) -> None:
    """Every file a reader would open is whole (temporary files are never read)."""
    for path in folder.rglob("*"):
        if not path.is_file() or path.name.startswith(".") and path.name.endswith(".tmp"):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".safetensors":
            load_file(path)


def without_timing(result: dict) -> dict:
    return {**result, "setup": {k: v for k, v in result["setup"].items()
                                if k not in ("seconds", "command")}}


@pytest.mark.parametrize("seed", SEEDS)
def test_a_killed_eval_leaves_whole_files_and_reruns_to_the_same_result(tmp_path, tiny_dir,
                                                                       seed):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"problem": f"t{i} t{i + 1}", "answer": str(i)}) + "\n"
                            for i in range(4, 10)))
    argv = ["eval", "--model", str(tiny_dir), "--task", str(task), "--max-new-tokens", "6",
            "--batch-size", "2"]
    code, commits = run([*argv, "--out", str(tmp_path / "straight" / "r.json")], tmp_path)
    assert code == 0 and commits >= 2
    kill_at = random.Random(seed).randint(1, commits)
    print(f"seed {seed}: killing eval at file commit {kill_at} of {commits}")
    out = tmp_path / "killed" / "r.json"
    code, _ = run([*argv, "--out", str(out)], tmp_path, kill_at)
    assert code == -signal.SIGKILL
    assert_complete(out.parent)
    assert run([*argv, "--out", str(out)], tmp_path)[0] == 0
    assert_complete(out.parent)
    straight = json.loads((tmp_path / "straight" / "r.json").read_text())
    assert without_timing(json.loads(out.read_text())) == without_timing(straight)
    assert out.with_suffix(".jsonl").read_text() == \
        (tmp_path / "straight" / "r.jsonl").read_text()


@pytest.mark.parametrize("seed", SEEDS)
def test_a_killed_distill_leaves_whole_files_and_resumes_to_the_same_adapter(tmp_path,
                                                                            tiny_dir, seed):
    argv = ["distill", "--model", str(tiny_dir), "--method", "cats", "--rank", "4",
            "--data", "gsm8k", "--samples", "16", "--held-out", "4", "--max-length", "160",
            "--e2e-batch", "8", "--e2e-epochs", "2", "--checkpoint-every", "1"]
    code, commits = run([*argv, "--out", str(tmp_path / "straight")], tmp_path)
    assert code == 0 and commits >= 4
    kill_at = random.Random(seed).randint(1, commits)
    print(f"seed {seed}: killing distill at file commit {kill_at} of {commits}")
    out = tmp_path / "killed"
    code, _ = run([*argv, "--out", str(out)], tmp_path, kill_at)
    assert code == -signal.SIGKILL
    assert_complete(out)
    resumed = [*argv, "--out", str(out)] + (["--resume"] if (out / "run.json").exists() else [])
    assert run(resumed, tmp_path)[0] == 0
    assert_complete(out)
    assert not list(out.rglob(".*.tmp"))  # the resumed run cleared what the kill left
    assert (out / "adapter.safetensors").read_bytes() == \
        (tmp_path / "straight" / "adapter.safetensors").read_bytes()
