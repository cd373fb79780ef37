"""A prompt fed in chunks (phases.prefill): each method still selects from all of it."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from helpers import attached_copy, randomize_lowrank
from transformers import DynamicCache

import caprese
from caprese import phases
from caprese.bench.decode import greedy_decode
from caprese.methods import build_method
from caprese.methods.cats import cats_threshold
from caprese.methods.griffin import griffin_scores

PIECES = [(0, 3), (3, 4), (4, 9), (9, 13)]


def _activations(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    act = torch.randn(3, 13, 64, generator=generator).to(dtype)
    valid = torch.ones(3, 13, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    valid[2, :12] = False  # one real token, in the last piece
    return act, valid


def _streamed(method, act, hidden, valid):
    stream = None
    for start, end in PIECES:
        stream = method.accumulate(stream, act[:, start:end], hidden[:, start:end],
                                   valid[:, start:end])
    return method.finish(stream)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_cats_threshold_from_pieces_is_the_whole_prompts_exactly(dtype, density):
    act, valid = _activations(dtype)
    cats = build_method("cats", density)
    assert cats.streams(dtype) and not cats.streams(torch.float32)
    scores, taus = _streamed(cats, act, act, valid)
    assert scores is None
    assert taus.dtype == dtype
    assert torch.equal(taus, cats_threshold(act, valid, density))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_griffin_scores_from_pieces_are_the_whole_prompts(dtype):
    act, valid = _activations(dtype, seed=1)
    hidden = act * 2 - 0.3
    griffin = build_method("griffin", 0.25)
    scores, selection = _streamed(griffin, act, hidden, valid)
    whole = griffin_scores(hidden, valid)
    torch.testing.assert_close(scores, whole, rtol=1e-6, atol=0)
    assert torch.equal(selection, griffin.select_top(whole))


def _attached(method: str, rank: int | None, dtype=torch.float32, **config):
    model = attached_copy(tiny_model("qwen2").to(dtype), method=method, density=0.5,
                          rank=rank, **config)
    if rank:
        randomize_lowrank(model, scale=0.3)
    return model


def _forwards(model) -> list[int]:
    """Widths of the decoder stack's forwards (to see the prompt go in pieces)."""
    widths: list[int] = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True)
    return widths


@pytest.mark.parametrize("method, rank, config", [
    ("griffin", None, {}), ("griffin", 8, {}), ("none", 8, {}),
    ("griffin", 8, {"reselect_every": 3}),
])
def test_chunked_prefill_decodes_what_one_piece_decodes(method, rank, config):
    model = _attached(method, rank, **config)
    prompt = prompt_ids(batch=2, length=13)
    whole = greedy_decode(model, prompt, 8)
    selections = [b.selection for b in caprese.blocks(model).values()]
    widths = _forwards(model)
    chunked = greedy_decode(model, prompt, 8, prefill_chunk=4)
    assert widths[:4] == [4, 4, 4, 1]  # the prompt went in pieces
    assert torch.equal(chunked.tokens, whole.tokens)
    if not config:
        for block, selection in zip(caprese.blocks(model).values(), selections, strict=True):
            assert (block.selection is None and selection is None) or torch.equal(
                block.selection, selection)


def test_the_full_model_takes_a_prompt_in_pieces_too():
    model = tiny_model("llama")
    prompt = prompt_ids(batch=1, length=13)
    assert torch.equal(greedy_decode(model, prompt, 6, prefill_chunk=5).tokens,
                       greedy_decode(model, prompt, 6).tokens)


def test_cats_in_fp32_takes_the_prompt_in_one_piece():
    model = _attached("cats", 8)
    widths = _forwards(model)
    greedy_decode(model, prompt_ids(batch=1, length=13), 3, prefill_chunk=4)
    assert widths[0] == 13  # an exact fp32 quantile needs every value at once


def test_cats_in_bf16_sets_its_threshold_from_every_piece():
    model = _attached("cats", 8, dtype=torch.bfloat16)
    prompt = prompt_ids(batch=2, length=13)
    greedy_decode(model, prompt, 3)
    whole = [b.selection.float() for b in caprese.blocks(model).values()]
    widths = _forwards(model)
    greedy_decode(model, prompt, 3, prefill_chunk=4)
    assert widths[:4] == [4, 4, 4, 1]
    for block, taus in zip(caprese.blocks(model).values(), whole, strict=True):
        # the pieces' attention rounds apart from one piece's in bf16: close, not equal
        torch.testing.assert_close(block.selection.float(), taus, rtol=0.05, atol=0)


def test_left_padded_pieces_select_like_one_padded_prompt():
    model = _attached("griffin", 8)
    ids = prompt_ids(batch=2, length=11)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    name = phases.cache_argument(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True,
              **{name: DynamicCache(config=model.config)})
    whole = [b.selection for b in caprese.blocks(model).values()]
    phases.prefill(model, ids, DynamicCache(config=model.config), chunk=3, attention_mask=mask)
    for block, selection in zip(caprese.blocks(model).values(), whole, strict=True):
        assert torch.equal(block.selection, selection)


def test_a_prefill_that_failed_leaves_nothing_behind():
    model = _attached("griffin", None)
    prompt = prompt_ids(batch=1, length=13)
    whole = greedy_decode(model, prompt, 5)
    with pytest.raises(ValueError, match="at least 1"):
        phases.prefill(model, prompt, DynamicCache(config=model.config), chunk=0)
    assert not caprese.phases.state_of(model).prompt_chunks
    assert torch.equal(greedy_decode(model, prompt, 5, prefill_chunk=6).tokens, whole.tokens)
