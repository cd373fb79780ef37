"""GRIFFIN's selection and CATS's threshold against direct reference computations."""

from __future__ import annotations

import pytest
import torch

from caprese.methods import Cats, Griffin, griffin


def random_prompt(batch=3, seq=7, d_ff=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    act = torch.randn(batch, seq, d_ff, generator=generator)
    hidden = act * torch.randn(batch, seq, d_ff, generator=generator)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    valid[2, 5:] = False  # right padding
    return act, hidden, valid


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
def test_griffin_selection_matches_reference(density):
    act, hidden, valid = random_prompt()
    selection = Griffin(density).select(act, hidden, valid)
    k = round(density * 40)
    for b in range(3):
        z = hidden[b][valid[b]]  # the sample's real prompt tokens only
        scores = torch.zeros(40)
        for j in range(40):  # column l2 norm of the row-normalised activations
            scores[j] = sum((z[t, j] / z[t].norm()) ** 2 for t in range(len(z))).sqrt()
        expected = sorted(scores.argsort(descending=True)[:k].tolist())
        assert selection[b].tolist() == expected


@pytest.mark.parametrize("chunk_bytes", [4 * 40 * 3, 2 << 20])  # one token at a time; whole
def test_griffin_squares_in_chunks_or_whole_give_the_same_scores(chunk_bytes, monkeypatch):
    """A CPU squares the prompt in cache-sized chunks, a GPU all at once: same scores."""
    monkeypatch.setattr(griffin, "_SQUARES_BYTES", chunk_bytes)
    _, hidden, valid = random_prompt()
    unit = hidden.double() / hidden.double().norm(dim=-1, keepdim=True)
    expected = (unit.square() * valid[..., None]).sum(dim=1)
    torch.testing.assert_close(griffin.squared_scores(hidden, valid).double(), expected)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
def test_cats_threshold_matches_reference(density, kernel, monkeypatch):
    from caprese.kernels import cpu

    if not kernel:
        monkeypatch.setattr(cpu, "abs_order_statistic", lambda *args: None)
    act, hidden, valid = random_prompt()
    tau = Cats(density).select(act, hidden, valid)
    for b in range(3):
        values = act[b][valid[b]].abs().flatten()
        expected = torch.quantile(values, 1.0 - density, interpolation="lower")
        assert tau[b] == expected
        kept = (values > tau[b]).float().mean().item()
        assert abs(kept - density) <= 2 / values.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.9, 1.0 - 1e-6])
def test_cats_sorted_threshold_equals_counting(density, dtype):
    """The GPU's sort gives the CPU histogram's threshold exactly: padding, ties, zeros."""
    from caprese.methods.cats import cats_threshold, sorted_threshold

    generator = torch.Generator().manual_seed(5)
    act = (torch.randn(3, 40, 200, generator=generator) * 3).to(dtype)
    act[0, 0, :9] = 0.0
    act[2, 5, :50] = act[2, 5, 0]  # many equal magnitudes
    act[1, 30:] = 0.0  # padding below every real value: counted, it would move tau
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[1, 30:] = False
    valid[2, :3] = False
    tau = sorted_threshold(act, valid, density)
    assert tau.dtype == dtype
    assert torch.equal(tau, cats_threshold(act, valid, density))
    with pytest.raises(ValueError, match="at least one prompt token"):
        sorted_threshold(act, torch.zeros_like(valid), density)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cats_threshold_on_a_gpu_equals_the_cpus():
    """On CUDA the threshold comes from a sort (no histogram, no host sync); same tau."""
    from caprese.methods.cats import cats_threshold

    generator = torch.Generator().manual_seed(6)
    act = (torch.randn(2, 300, 1000, generator=generator) * 2).to(torch.bfloat16)
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[0, :40] = False
    for density in (0.3, 0.5):
        expected = cats_threshold(act, valid, density)
        assert torch.equal(cats_threshold(act.cuda(), valid.cuda(), density).cpu(), expected)


def test_masks_keep_what_was_selected():
    act, hidden, valid = random_prompt()
    griffin = Griffin(0.25)
    selection = griffin.select(act, hidden, valid)
    mask = griffin.keep_mask(selection, act)
    assert mask.shape == (3, 1, 40)
    assert mask.sum(dim=-1).flatten().tolist() == [10, 10, 10]
    cats = Cats(0.25)
    tau = cats.select(act, hidden, valid)
    assert torch.equal(cats.keep_mask(tau, act), (act.abs() > tau[:, None, None]).float())


def test_density_one_keeps_everything():
    act, hidden, valid = random_prompt()
    assert Griffin(1.0).select(act, hidden, valid) is None
    assert Cats(1.0).select(act, hidden, valid) is None
    assert Griffin(1.0).keep_mask(None, act) is None


def test_gathered_equals_masked():
    """GRIFFIN's gathered small matrices compute the masked dense MLP."""
    torch.manual_seed(0)
    mlp = torch.nn.Module()
    mlp.gate_proj = torch.nn.Linear(16, 40, bias=True)
    mlp.up_proj = torch.nn.Linear(16, 40, bias=True)
    mlp.down_proj = torch.nn.Linear(40, 16, bias=True)
    act, hidden, valid = random_prompt()
    griffin = Griffin(0.5)
    selection = griffin.select(act, hidden, valid)
    fast = griffin.gather(mlp, selection)
    x = torch.randn(3, 2, 16)
    small = torch.nn.functional.silu(torch.bmm(x, fast.gate.transpose(1, 2))
                                     + fast.gate_bias[:, None])
    small = small * (torch.bmm(x, fast.up.transpose(1, 2)) + fast.up_bias[:, None])
    small = torch.bmm(small, fast.down_rows) + mlp.down_proj.bias
    act_full = torch.nn.functional.silu(mlp.gate_proj(x))
    masked = mlp.down_proj(act_full * griffin.keep_mask(selection, act_full) * mlp.up_proj(x))
    torch.testing.assert_close(small, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.9, 1.0 - 1e-6])
def test_cats_bf16_threshold_by_counting_equals_kthvalue(density, kernel, monkeypatch):
    from caprese.kernels import cpu
    from caprese.methods.cats import cats_threshold

    if not kernel:
        monkeypatch.setattr(cpu, "abs_order_statistic", lambda *args: None)
    generator = torch.Generator().manual_seed(3)
    act = (torch.randn(2, 50, 300, generator=generator) * 3).to(torch.bfloat16)
    act[0, 0, :7] = 0.0  # ties and zeros
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :20] = False
    tau = cats_threshold(act, valid, density)
    for b in range(2):
        values = act[b][valid[b]].abs().flatten()
        rank = int((1.0 - density) * (values.numel() - 1))
        assert tau[b].dtype == torch.bfloat16
        assert tau[b] == values.kthvalue(rank + 1).values
