"""Grouped-query attention (compiled CPU decode steps) against transformers' eager attention."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from caprese.kernels.attention import GROUPED, grouped_query_attention


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


def test_grouped_attention_is_registered_with_eager_masks():
    assert AttentionInterface()[GROUPED] is grouped_query_attention
    assert AttentionMaskInterface()[GROUPED] is eager_mask
