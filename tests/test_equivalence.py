"""The equivalences every fast path and phase must keep (fp32 tiny models, fixed seeds)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from helpers import attached_copy, generate_with_logits, randomize_lowrank, set_fused

import caprese

METHODS = ["griffin", "cats"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [None, 8])
def test_density_one_is_the_original_model(family, method, rank):
    base = tiny_model(family)
    ids = prompt_ids()
    model = attached_copy(base, method=method, density=1.0, rank=rank, layers=[0, 1, 2, 3])
    set_fused(model, rank is None)  # the fused form of R = 0 is exact only up to rounding
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # prefill
        tokens, logits = generate_with_logits(model, ids)  # prefill + decode
        ref_tokens, ref_logits = generate_with_logits(base, ids)
        assert torch.equal(tokens, ref_tokens)
        assert torch.equal(logits, ref_logits)
        with caprese.split(model, [4, 7]):  # split
            assert torch.equal(model(tokens).logits, base(tokens).logits)


@pytest.mark.parametrize("method", METHODS)
def test_zero_R_equals_method_alone(family, method):
    base = tiny_model(family)
    ids = prompt_ids()
    with_path = attached_copy(base, method=method, density=0.5, rank=8)
    alone = attached_copy(base, method=method, density=0.5, rank=None)
    with torch.no_grad():
        tokens, logits = generate_with_logits(with_path, ids)
        ref_tokens, ref_logits = generate_with_logits(alone, ids)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        with caprese.split(with_path, [6, 6]), caprese.split(alone, [6, 6]):
            torch.testing.assert_close(with_path(tokens).logits, alone(tokens).logits)
    # ... and the method really changes the model, or the test above would prove nothing.
    with torch.no_grad():
        assert not torch.allclose(logits, generate_with_logits(base, ids)[1], atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fused", [True, False])
def test_each_block_adds_exactly_x_L_R(method, fused):
    model = attached_copy(tiny_model("llama"), method=method, density=0.5, rank=8)
    randomize_lowrank(model)
    set_fused(model, fused)
    ids = prompt_ids()
    with torch.no_grad():
        model(ids)  # prefill: every block keeps its selection
        x = torch.randn(2, 1, 32)
        with caprese.forced_phase(model, caprese.Phase.DECODE):
            for block in caprese.blocks(model).values():
                with_path = block(x)
                R = block.R.clone()
                block.R.zero_()
                block.fast = None
                alone = block(x)
                block.R.copy_(R)
                torch.testing.assert_close(with_path - alone, x @ block.L @ block.R,
                                           rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_split_equals_step_by_step_generation(family, method):
    model = attached_copy(tiny_model(family), method=method, density=0.5, rank=8)
    randomize_lowrank(model, scale=0.3)
    ids = prompt_ids(length=9)
    with torch.no_grad():
        tokens, step_logits = generate_with_logits(model, ids, steps=5)
        with caprese.split(model, [9, 9]):
            logits = model(tokens).logits
    torch.testing.assert_close(logits[:, 8:-1], step_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_fused_equals_reference(family, method):
    model = attached_copy(tiny_model(family), method=method, density=0.5, rank=8)
    randomize_lowrank(model, scale=0.3)
    ids = prompt_ids()
    with torch.no_grad():
        tokens, fused_logits = generate_with_logits(model, ids, steps=6)
        set_fused(model, False)
        ref_tokens, ref_logits = generate_with_logits(model, ids, steps=6)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(fused_logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_equals_samples_alone(family, method):
    model = attached_copy(tiny_model(family), method=method, density=0.5, rank=8)
    randomize_lowrank(model, scale=0.3)
    long, short = prompt_ids(1, 10, seed=3), prompt_ids(1, 6, seed=4)
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([long, torch.cat([pad, short], dim=1)])  # left padding
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        tokens, logits = generate_with_logits(model, batch, attention_mask=mask)
        for row, alone in enumerate([long, short]):
            alone_tokens, alone_logits = generate_with_logits(model, alone)
            assert torch.equal(tokens[row, -4:], alone_tokens[0, -4:])
            torch.testing.assert_close(logits[row], alone_logits[0], rtol=1e-4, atol=1e-4)

        # Right padding in split mode: the short sample's pads sit after its continuation.
        seqs = [tokens[0], tokens[1, 4:]]
        right = torch.zeros(2, 14, dtype=torch.long)
        right_mask = torch.zeros(2, 14, dtype=torch.long)
        for row, seq in enumerate(seqs):
            right[row, : len(seq)], right_mask[row, : len(seq)] = seq, 1
        with caprese.split(model, [10, 6]):
            batched = model(right, attention_mask=right_mask).logits
        for row, seq in enumerate(seqs):
            with caprese.split(model, [len(seq) - 4]):
                alone = model(seq[None]).logits
            torch.testing.assert_close(batched[row, : len(seq)], alone[0], rtol=1e-4, atol=1e-4)


def test_selection_ignores_padding():
    model = attached_copy(tiny_model("qwen2"), method="griffin", density=0.5, rank=None)
    ids = prompt_ids(1, 8)
    padded = torch.cat([torch.full((1, 5), 7), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        model(ids)
        alone = {i: b.selection.clone() for i, b in caprese.blocks(model).items()}
        model(padded, attention_mask=mask)
    for index, block in caprese.blocks(model).items():
        assert torch.equal(block.selection, alone[index])


def test_sampling_generation_runs_and_is_seeded():
    model = attached_copy(tiny_model("gemma2"), method="cats", density=0.5, rank=8)
    randomize_lowrank(model, scale=0.3)
    ids = prompt_ids()
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                   temperature=0.8, top_p=0.95, max_new_tokens=6,
                                   pad_token_id=0))
    assert outs[0].shape == (2, 16)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("rank", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cats_sparse_decode_equals_masked_dense(rank, dtype):
    from caprese.kernels import cpu

    assert cpu.module() is not None, "the CPU sparse kernels did not build"
    model = attached_copy(tiny_model("mistral").to(dtype), method="cats", density=0.4, rank=rank)
    if rank:
        randomize_lowrank(model, scale=0.3)
    ids = prompt_ids(1, 12)
    calls = []
    original = cpu.cats_decode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "cats_decode", lambda *a: calls.append(1) or original(*a))
        with torch.no_grad():
            tokens, sparse_logits = generate_with_logits(model, ids, steps=6)
    assert len(calls) == 5 * 4  # every decode step of every layer took the sparse path
    with torch.no_grad():
        set_fused(model, False)
        ref_tokens, ref_logits = generate_with_logits(model, ids, steps=6)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(sparse_logits, ref_logits, rtol=tolerance, atol=tolerance)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("batch, density, gathers", [(1, 0.5, True), (3, 0.25, True),
                                                     (2, 0.5, False), (4, 0.3, False)])
def test_griffin_gathers_per_sample_only_while_it_reads_fewer_bytes(batch, density, gathers):
    """B samples' gathered matrices hold B k of D_FF rows: from B k >= D_FF on, one masked
    dense pass is cheaper, and it gives the same outputs."""
    model = attached_copy(tiny_model("llama"), method="griffin", density=density, rank=4)
    randomize_lowrank(model, scale=0.3)
    ids = prompt_ids(batch, 10)
    with torch.no_grad():
        tokens, logits = generate_with_logits(model, ids, steps=4)
        fast = [b.fast for b in caprese.blocks(model).values()]
        assert all((f is not None) == gathers for f in fast)
        if gathers:
            assert all(f.up.shape[0] == batch for f in fast)  # per-sample matrices
        set_fused(model, False)
        ref_tokens, ref_logits = generate_with_logits(model, ids, steps=4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, ref_tokens)
