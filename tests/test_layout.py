"""Memory: the fused decode layouts take the place of W1 and W2 rather than copying them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import prompt_ids, tiny_model
from helpers import attached_copy, generate_with_logits, randomize_lowrank, set_fused

import caprese
from caprese.bench.latency import storage_bytes

# (method, density, rank): every shared-weight variant that needs a layout of its own.
SHARED = [("cats", 0.5, None), ("cats", 0.5, 8), ("griffin", 1.0, 8), ("none", 1.0, 8)]


def decode_tensors(model) -> list[torch.Tensor]:
    """Every tensor the model holds: parameters and each block's decode weights."""
    tensors = list(model.parameters())
    for block in caprese.blocks(model).values():
        if block.fast is not None:
            tensors += [t for t in vars(block.fast).values() if t is not None]
    return tensors


@pytest.mark.parametrize("method, density, rank", SHARED)
def test_shared_decode_weights_are_the_model_weights(method, density, rank):
    model = attached_copy(tiny_model("llama"), method=method, density=density, rank=rank)
    if rank:
        randomize_lowrank(model, scale=0.3)
    params = storage_bytes(model.parameters())
    with torch.no_grad():
        generate_with_logits(model, prompt_ids(2, 8), steps=3)
    for block in caprese.blocks(model).values():
        fast, mlp = block.fast, block.mlp
        assert fast is not None and fast.gate is mlp.gate_proj.weight
        for rows, weight in ((fast.up, mlp.up_proj.weight), (fast.down_rows, mlp.down_proj.weight)):
            assert rows.is_contiguous()
            assert rows.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    # The layouts add only the r rows of L and R per block: no second copy of any matrix.
    extra = sum(2 * b.L.numel() * 4 for b in caprese.blocks(model).values()) if rank else 0
    assert storage_bytes(decode_tensors(model)) <= params + extra


@pytest.mark.parametrize("method, density, rank", SHARED)
def test_decode_after_the_path_changes_equals_the_reference(method, density, rank):
    """The cached layout rewrites L and R when they change (as E2E training does)."""
    model = attached_copy(tiny_model("llama"), method=method, density=density, rank=rank)
    ids = prompt_ids(2, 8)
    with torch.no_grad():
        generate_with_logits(model, ids, steps=3)  # builds the layouts
        if rank:
            randomize_lowrank(model, seed=1, scale=0.3)
        tokens, fused = generate_with_logits(model, ids, steps=3)
        set_fused(model, False)
        ref_tokens, reference = generate_with_logits(model, ids, steps=3)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, density, rank", [*SHARED, ("griffin", 0.5, 8)])
def test_detach_gives_the_weights_back_in_their_own_storage(method, density, rank):
    base = tiny_model("llama")
    model = attached_copy(base, method=method, density=density, rank=rank)
    ids = prompt_ids(2, 8)
    with torch.no_grad():
        generate_with_logits(model, ids, steps=3)
        caprese.detach(model)
        assert torch.equal(model(ids).logits, base(ids).logits)
    for name, param in model.named_parameters():
        assert param.is_contiguous(), name
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size(), name
        assert torch.equal(param, dict(base.named_parameters())[name]), name


def test_a_copy_of_an_attached_model_builds_its_own_layouts():
    """deepcopy gives the weights new storage: the copy's cached layout must not be reused."""
    model = attached_copy(tiny_model("llama"), method="cats", density=0.5, rank=8)
    randomize_lowrank(model, scale=0.3)
    ids = prompt_ids(1, 8)
    with torch.no_grad():
        tokens, logits = generate_with_logits(model, ids, steps=3)
        twin = copy.deepcopy(model)
        twin_tokens, twin_logits = generate_with_logits(twin, ids, steps=3)
    assert torch.equal(tokens, twin_tokens)
    torch.testing.assert_close(logits, twin_logits)
    for block in caprese.blocks(twin).values():
        assert block.fast.up.data_ptr() == block.mlp.up_proj.weight.data_ptr()


@pytest.mark.parametrize("method, rank", [("cats", 8), ("griffin", 8), ("griffin", None)])
def test_per_attach_work_happens_once_and_per_prompt_work_once_per_prompt(method, rank,
                                                                       monkeypatch):
    """prepare_decode stores the layouts (once per attach); each prompt selects once per
    block (CATS' threshold, GRIFFIN's neurons), GRIFFIN gathers once per block from rows of
    W2^T, and no prompt moves a weight again."""
    model = attached_copy(tiny_model("llama"), method=method, density=0.5, rank=rank)
    blocks = caprese.blocks(model).values()
    calls = {"select": 0, "gather": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    method_object = next(iter(blocks)).method
    # a method that reselects selects from its stored scores (select_top), once per prompt
    choose = "select_top" if method_object.reselects else "select"
    monkeypatch.setattr(method_object, choose, counted("select", getattr(method_object, choose)))
    monkeypatch.setattr(method_object, "gather", counted("gather", method_object.gather))
    caprese.prepare_decode(model, batch=1)
    for block in blocks:  # W2 is stored as rows of W2^T, in place
        assert block.mlp.down_proj.weight.t().is_contiguous()
    where = [(b.mlp.up_proj.weight.data_ptr(), b.mlp.down_proj.weight.data_ptr()) for b in blocks]
    if method == "griffin":  # allocated once per attach; each prompt fills them
        where += [b._gathered.up.data_ptr() for b in blocks]
    with torch.no_grad():
        for prompt in range(2):
            generate_with_logits(model, prompt_ids(1, 8), steps=4)
            assert calls["select"] == (prompt + 1) * len(blocks)
            assert calls["gather"] == (prompt + 1) * len(blocks) * (method == "griffin")
    now = [(b.mlp.up_proj.weight.data_ptr(), b.mlp.down_proj.weight.data_ptr()) for b in blocks]
    if method == "griffin":
        now += [b.fast.up.data_ptr() for b in blocks]
    assert where == now


def test_griffin_writes_each_prompts_matrices_over_the_last_ones():
    """Per-prompt gathering reuses the previous prompt's matrices when shapes fit, and a
    prompt decodes exactly as it does on a fresh model (nothing of the last one remains)."""
    model = attached_copy(tiny_model("llama"), method="griffin", density=0.5, rank=8)
    randomize_lowrank(model, scale=0.3)
    fresh = copy.deepcopy(model)
    first, second = prompt_ids(1, 8), prompt_ids(1, 8) + 7
    with torch.no_grad():
        generate_with_logits(model, first, steps=3)
        where = [b.fast.up.data_ptr() for b in caprese.blocks(model).values()]
        tokens, logits = generate_with_logits(model, second, steps=3)
        assert where == [b.fast.up.data_ptr() for b in caprese.blocks(model).values()]
        ref_tokens, ref_logits = generate_with_logits(fresh, second, steps=3)
        assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
