"""Batched generation retires ended answers: it must give exactly the one-by-one outputs."""

from __future__ import annotations

import pytest
import torch

import caprese
import caprese.generation as generation
from caprese.generation import GenerationSettings, generate
from tests.conftest import tiny_model
from tests.helpers import attached_copy, randomize_lowrank, word_tokenizer

MAX_NEW = 12


def prompts() -> list[str]:
    return [" ".join(f"t{4 + (5 * i + 3 * j) % 90}" for j in range(4 + 2 * i)) for i in range(5)]


def one_by_one(model, tokenizer, texts: list[str]) -> list[list[int]]:
    """transformers' generate on each prompt alone, to max_new_tokens or an end token."""
    ends = generation.end_ids(model, tokenizer)
    outputs = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW, pad_token_id=0)
        tokens = out[0, ids.shape[1]:].tolist()
        length = next((i + 1 for i, t in enumerate(tokens) if t in ends), len(tokens))
        outputs.append(tokens[:length])
    return outputs


def variant(method: str | None):
    model = tiny_model("qwen2")
    if method is None:
        return model
    model = attached_copy(model, method=method, density=0.5, rank=8)
    randomize_lowrank(model, scale=0.3)
    return model


@pytest.mark.parametrize("method", [None, "griffin", "cats", "nf4"])
def test_retiring_ended_rows_gives_the_one_by_one_outputs(method, monkeypatch):
    model = variant(method)
    tokenizer = word_tokenizer()
    texts = prompts()
    alone = one_by_one(model, tokenizer, texts)
    # An end token that the first answer writes early and the others later or never, so rows
    # leave the batch at different segments.
    model.generation_config.eos_token_id = alone[0][2]
    alone = one_by_one(model, tokenizer, texts)
    assert len({len(tokens) for tokens in alone}) > 1, "every answer has the same length"

    widths, kept = [], []
    forward = model.forward

    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        widths.append(ids.shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    real_keep = caprese.phases.keep_samples
    monkeypatch.setattr(caprese.phases, "keep_samples",
                        lambda m, index: kept.append(len(index)) or real_keep(m, index))
    monkeypatch.setattr(generation, "RETIRE_EVERY", 3)
    batched = generate(model, tokenizer, texts, GenerationSettings(
        max_new_tokens=MAX_NEW, batch_size=len(texts)), progress=False)
    assert [list(row[0].ids) for row in batched] == alone
    assert kept and min(kept) < len(texts)  # rows left the batch ...
    assert sum(widths) < len(texts) * MAX_NEW  # ... and the steps left with them


def test_sampled_rows_retire_and_stay_seeded():
    model = variant("cats")
    tokenizer = word_tokenizer()
    settings = GenerationSettings(max_new_tokens=MAX_NEW, batch_size=3, temperature=0.9,
                                  top_p=0.95, samples=2, seed=5)
    first = generate(model, tokenizer, prompts(), settings, progress=False)
    again = generate(model, tokenizer, prompts(), settings, progress=False)
    assert [[c.ids for c in row] for row in first] == [[c.ids for c in row] for row in again]
    assert all(len(row) == 2 for row in first)
    assert all(0 < c.tokens <= MAX_NEW for row in first for c in row)


def test_a_stop_string_ends_an_answer_and_its_row(monkeypatch):
    model = variant("griffin")
    tokenizer = word_tokenizer()
    texts = prompts()
    model.generation_config.eos_token_id = None  # only the stop string ends an answer
    alone = one_by_one(model, tokenizer, texts)
    stop = f"t{alone[0][3]}"  # the first answer's fourth word
    kept = []
    real_keep = caprese.phases.keep_samples
    monkeypatch.setattr(caprese.phases, "keep_samples",
                        lambda m, index: kept.append(len(index)) or real_keep(m, index))
    monkeypatch.setattr(generation, "RETIRE_EVERY", 2)
    batched = generate(model, tokenizer, texts, GenerationSettings(
        max_new_tokens=MAX_NEW, batch_size=len(texts), stop=(stop,)), progress=False)
    for completion, tokens in zip((row[0] for row in batched), alone, strict=True):
        text = " ".join(f"t{t}" for t in tokens)
        # the shortest prefix whose text holds the stop string (as a substring, like "t4" in
        # "t45"), its text cut before the string
        count = next((n for n in range(1, len(tokens) + 1)
                      if stop in " ".join(f"t{t}" for t in tokens[:n])), None)
        if count is not None:
            assert completion.tokens == count and not completion.truncated
            assert completion.text == text[: text.index(stop)]
        else:
            assert completion.text == text and completion.truncated
    assert batched[0][0].tokens == 4 and kept and min(kept) < len(texts)
