"""Grouped-query attention (compiled CPU decode steps) against transformers' eager attention."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from caprese.kernels import cpu
from caprese.kernels.attention import DECODE, GROUPED, decode_attention, grouped_query_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("group", [1, 3])
def test_grouped_attention_equals_eager_attention(group, length, softcap, dtype):
    """Every query head attends to its own KV head's keys, as after eager's repeat_kv: a
    decode step (one query) and a prompt piece, with and without Gemma 2's soft cap, and a
    causal-style additive mask with masked positions."""
    generator = torch.Generator().manual_seed(group * 10 + length)
    batch, kv_heads, keys, dim = 2, 2, 9, 16
    query = torch.randn(batch, kv_heads * group, length, dim, generator=generator).to(dtype)
    key, value = (torch.randn(batch, kv_heads, keys, dim, generator=generator).to(dtype)
                  for _ in range(2))
    allowed = torch.rand(batch, 1, length, keys, generator=generator) > 0.3
    allowed[..., 0] = True  # every query attends to something
    mask = torch.zeros(batch, 1, length, keys, dtype=dtype).masked_fill(
        ~allowed, torch.finfo(dtype).min)
    module = SimpleNamespace(num_key_value_groups=group, head_dim=dim, training=False)
    expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.3,
                                          softcap=softcap)
    got, weights = grouped_query_attention(module, query, key, value, mask, scaling=0.3,
                                           softcap=softcap)
    assert weights is None and got.shape == (batch, length, kv_heads * group, dim)
    tolerance = {} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got, expected, **tolerance)


def test_grouped_attentions_are_registered_with_eager_masks():
    assert AttentionInterface()[GROUPED] is grouped_query_attention
    assert AttentionInterface()[DECODE] is decode_attention
    assert AttentionMaskInterface()[GROUPED] is eager_mask
    assert AttentionMaskInterface()[DECODE] is eager_mask


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 13),
       dim=st.integers(1, 140), positions=st.integers(1, 40), tail=st.integers(0, 9),
       closed=st.floats(0, 1), masked=st.booleans(), bf16=st.booleans(),
       seed=st.integers(0, 2**16))
def test_decode_kernel_equals_grouped_attention(batch, kv_heads, group, dim, positions, tail,
                                                closed, masked, bf16, seed):
    """One query against a static cache's keys and values (a closed tail of `tail`
    positions past `positions`): any grouping (more query heads per KV head than one pass
    of the kernel takes), head size (vector tails), share of closed positions (none, all),
    no mask, and a query laid out as the model's (heads transposed, not contiguous)."""
    check_decode_kernel(batch, kv_heads, group, dim, positions, tail, closed, masked, bf16,
                        seed)


@pytest.mark.parametrize("dim", [64, 96, 128])
@pytest.mark.parametrize("positions, closed", [(16, 0.0), (33, 0.0), (70, 0.3)])
def test_decode_kernel_at_model_head_sizes(dim, positions, closed):
    """Head sizes of real models, where the bf16 kernel scores whole blocks of 16 positions
    and weighs values two positions at a time (an odd count of open positions among them),
    64 dimensions a pass (96: a pass and a tail)."""
    for bf16 in (True, False):
        check_decode_kernel(batch=2, kv_heads=2, group=6, dim=dim, positions=positions, tail=5,
                            closed=closed, masked=True, bf16=bf16, seed=dim + positions)


def check_decode_kernel(batch, kv_heads, group, dim, positions, tail, closed, masked, bf16,
                        seed):
    assert cpu.module() is not None
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    heads, length = kv_heads * group, positions + tail
    query = torch.randn(batch, 1, heads, dim, generator=generator).to(dtype).transpose(1, 2)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
                  for _ in range(2))
    mask = None
    if masked:
        open_ = torch.rand(batch, 1, 1, length, generator=generator) >= closed
        open_[..., positions:] = False
        mask = torch.zeros(batch, 1, 1, length, dtype=dtype).masked_fill(
            ~open_, torch.finfo(dtype).min)
    module = SimpleNamespace(num_key_value_groups=group, head_dim=dim, training=False)
    expected, _ = grouped_query_attention(module, query, key, value, mask, scaling=dim ** -0.5)
    got = torch.ops.caprese.decode_attention(
        query, key, value, torch.empty(0) if mask is None else mask[:, 0, 0].float(), dim ** -0.5)
    assert got.dtype == dtype and got.shape == (batch, 1, heads, dim)
    # bf16: the scores are rounded to bf16 after sums taken in another order than PyTorch's,
    # so a weight may round one bf16 step apart; the outputs are weighted means of values.
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, expected, **tolerance)


def test_decode_attention_uses_the_kernel_for_one_query_only(monkeypatch):
    """DECODE sends a decode token to the kernel; a prompt piece, or a soft cap (Gemma 2),
    goes to grouped_query_attention."""
    calls = []
    monkeypatch.setattr(cpu, "decode_attention", lambda *args: calls.append(args) or None)
    module = SimpleNamespace(num_key_value_groups=2, head_dim=8, training=False)
    key = value = torch.randn(1, 1, 5, 8)
    for length, softcap in [(1, None), (3, None), (1, 30.0)]:
        query = torch.randn(1, 2, length, 8)
        expected, _ = grouped_query_attention(module, query, key, value, None, softcap=softcap)
        got, _ = decode_attention(module, query, key, value, None, softcap=softcap)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the kernel declined
    assert len(calls) == 1 and calls[0][0].shape[2] == 1
