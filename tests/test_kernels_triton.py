"""CATS' GPU sparse decode (Triton): compiled on a CUDA machine, else run on the CPU by
Triton's interpreter (scripts/gpu_checks.sh runs this file on a GPU)."""

from __future__ import annotations

import pytest
import torch

from caprese.kernels.triton import cats_decode  # interpreted on the CPU: conftest.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def masked_dense(x, act_gate, tau, up_rows, down_rows):
    """The reference: every row read, the dropped gate entries zeroed."""
    d_ff = act_gate.shape[-1]
    gate = act_gate * (act_gate.abs() > tau[:, None, None])
    ones = torch.ones(*gate.shape[:-1], up_rows.shape[0] - d_ff, dtype=gate.dtype)
    hidden = (x.double() @ up_rows.double().T) * torch.cat([gate, ones], -1).double()
    return hidden @ down_rows.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra_rows", [0, 5])  # 5: a low-rank path appended past D_FF
@pytest.mark.parametrize("rows_per_program", [512, 32])  # 32: four chunks, the last partial
def test_triton_cats_decode_equals_masked_dense(dtype, extra_rows, rows_per_program):
    generator = torch.Generator().manual_seed(0)
    batch, dim, d_ff = 3, 72, 100  # not multiples of the blocks: tails are masked
    x = torch.randn(batch, 1, dim, generator=generator).to(dtype)
    act_gate = torch.randn(batch, 1, d_ff, generator=generator).to(dtype)
    tau = act_gate.float().abs().reshape(batch, -1).quantile(0.5, dim=1)  # per sample
    up_rows = torch.randn(d_ff + extra_rows, dim, generator=generator).to(dtype)
    down_rows = torch.randn(d_ff + extra_rows, dim, generator=generator).to(dtype)
    got = cats_decode(*(t.to(DEVICE) for t in (x, act_gate, tau, up_rows, down_rows)),
                      rows_per_program=rows_per_program).cpu()
    want = masked_dense(x, act_gate, tau, up_rows, down_rows)
    assert got.shape == (batch, 1, dim) and got.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * 10)


def test_triton_cats_decode_skips_dropped_rows():
    """A dropped row's weights never matter: poison them and the result does not change."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 64, generator=generator)
    act_gate = torch.randn(1, 1, 96, generator=generator)
    tau = torch.tensor([0.7])
    up_rows, down_rows = torch.randn(96, 64, generator=generator), torch.randn(96, 64,
                                                                               generator=generator)
    dropped = act_gate.reshape(-1).abs() <= tau
    poisoned_up, poisoned_down = up_rows.clone(), down_rows.clone()
    poisoned_up[dropped] = float("nan")
    poisoned_down[dropped] = float("nan")
    x, act_gate, tau = x.to(DEVICE), act_gate.to(DEVICE), tau.to(DEVICE)
    clean = cats_decode(x, act_gate, tau, up_rows.to(DEVICE), down_rows.to(DEVICE))
    poisoned = cats_decode(x, act_gate, tau, poisoned_up.to(DEVICE), poisoned_down.to(DEVICE))
    assert torch.equal(poisoned, clean)


def test_triton_cats_decode_refuses_bad_layouts():
    rows = torch.randn(8, 4)
    with pytest.raises(ValueError, match="contiguous"):
        cats_decode(torch.randn(1, 1, 4), torch.randn(1, 1, 8), torch.zeros(1), rows.T.T[:, :3],
                    rows)
    with pytest.raises(ValueError, match="multiple of block_j"):  # chunks would overlap
        cats_decode(torch.randn(1, 1, 4), torch.randn(1, 1, 8), torch.zeros(1), rows, rows,
                    block_j=32, rows_per_program=48)


@pytest.mark.parametrize("rank", [None, 8])
def test_block_routes_batched_cats_decode_through_triton(rank):
    """The block's GPU route, taken on the CPU: a batch of two, each with its own tau."""
    import caprese
    import caprese.kernels.triton
    from tests.conftest import prompt_ids, tiny_model
    from tests.helpers import attached_copy, generate_with_logits, randomize_lowrank, set_fused

    model = attached_copy(tiny_model("mistral").to(DEVICE), method="cats", density=0.4,
                          rank=rank)
    if rank:
        randomize_lowrank(model, scale=0.3)
    ids = prompt_ids(2, 12).to(DEVICE)
    calls = []
    original = caprese.kernels.triton.cats_decode
    caprese.set_decode(model, kernels="triton")  # the GPU's route, on whatever device this is
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(caprese.kernels.triton, "cats_decode",
                      lambda *a: calls.append(1) or original(*a))
        tokens, logits = generate_with_logits(model, ids, steps=5)
    assert len(calls) == 4 * 4  # every decode step of every layer
    with torch.no_grad():
        set_fused(model, False)
        ref_tokens, ref_logits = generate_with_logits(model, ids, steps=5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_triton_cats_decode_compiles_as_one_operator():
    """A compiled decode step holds the launch as an opaque operator (CUDA graphs replay it),
    with the eager values."""
    generator = torch.Generator().manual_seed(2)
    x, act_gate = torch.randn(2, 1, 64, generator=generator), torch.randn(2, 1, 96,
                                                                          generator=generator)
    tau = torch.tensor([0.5, 0.9])
    up_rows, down_rows = (torch.randn(100, 64, generator=generator) for _ in range(2))
    args = [t.to(DEVICE) for t in (x, act_gate, tau, up_rows, down_rows)]
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    got = torch.compile(cats_decode, fullgraph=True, backend=backend)(*args)
    assert torch.equal(got, cats_decode(*args))
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert torch.ops.caprese_triton.cats_decode.default in targets
