"""E2E runs each prompt once, dense, and only the continuation per model: the same loss and
gradients as one whole-sequence SPLIT forward per model."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model
from distill_job import tiny_samples
from helpers import randomize_lowrank

import caprese
from caprese.distillation.e2e import e2e_loss, regrouped
from caprese.samples import collate


def loss_and_grads(model, batch, **options):
    model.zero_grad(set_to_none=True)
    total, tokens = e2e_loss(model, **options)(batch, 0.5)
    grads = [p.grad.clone() for block in caprese.blocks(model).values()
             for p in (block.L, block.R)]
    return total, tokens, grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, objective", [("griffin", "mse"), ("cats", "mse"),
                                               ("griffin", "kl")])
def test_prompt_once_gives_the_whole_sequences_loss_and_gradients(family, method, objective):
    model = caprese.attach(tiny_model(family), caprese.CapreseConfig(method=method, rank=4))
    randomize_lowrank(model, scale=0.3)
    batch = collate(tiny_samples(5, seed=3), 0)  # prompts of 4-11 tokens, sequences of 16-31
    # prompt-once first: the selection it decodes with must be its own prompt pass's, not one
    # left by the whole-sequence forward
    once, once_tokens, once_grads = loss_and_grads(model, batch, objective=objective)
    whole, whole_tokens, whole_grads = loss_and_grads(model, batch, objective=objective,
                                                      prompt_once=False)
    assert once_tokens == whole_tokens == int(batch.continuation.sum())
    assert whole > 1e-4 and once == pytest.approx(whole, rel=1e-4)
    for mine, theirs in zip(once_grads, whole_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    assert caprese.phases.state_of(model).decode.fused  # the decode options are put back


def test_regrouping_keeps_every_token_at_its_own_position():
    batch = collate(tiny_samples(4, seed=1), 0)
    prompt, cont, keep = regrouped(batch)
    for row in range(4):
        b, n = int(batch.boundary[row]), int(batch.attention_mask[row].sum())
        ids = batch.input_ids[row]
        real = prompt["attention_mask"][row].bool()
        assert prompt["input_ids"][row][real].tolist() == ids[:b].tolist()
        assert prompt["position_ids"][row][real].tolist() == list(range(b))
        assert real[-b:].all() and not real[:-b].any()  # left-padded: prompts end together
        assert cont["input_ids"][row][keep[row]].tolist() == ids[b:n].tolist()
        assert cont["position_ids"][row][keep[row]].tolist() == list(range(b, n))
    assert cont["attention_mask"].shape[1] == prompt["input_ids"].shape[1] + keep.shape[1]
