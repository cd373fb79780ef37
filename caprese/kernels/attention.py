"""Grouped-query attention without copying the KV cache, for compiled CPU decode steps.

transformers' eager attention first repeats each key and value head once per query head that
shares it (`repeat_kv`): on qwen2.5-coder-1.5b (12 query heads, 2 KV heads) a decode step
at 2048 cached tokens writes and reads about 0.8 GB of such copies, a quarter of what its
weights take. Here the query heads that share a KV head multiply that head's keys and values
as they are, one batched product per KV head; the arithmetic is eager attention's (scores in
the model's dtype, softmax in float32). Registered with transformers under GROUPED, with
eager attention's additive masks.

What those steps use is DECODE: the same, but a decode token's attention (one query) comes
from caprese's CPU kernel (decode_attention.h). PyTorch's batched products read a KV cache that
the weights streamed since have pushed out of the caches, without fetching ahead, and read
a static cache's masked tail too; the kernel reads each KV head's open positions once, front
to back, for all the query heads that share it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from caprese.kernels import cpu

GROUPED = "caprese_grouped"
DECODE = "caprese_decode"


def grouped_query_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, H, L, D), key and value (B, KV, S, D), H a multiple of KV, mask additive
    (B, 1, L, >= S); returns (B, L, H, D) as transformers' attention functions do. Inference
    only: dropout is not applied."""
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, group * length, dim)  # head h: KV head h // group
    scale = dim ** -0.5 if scaling is None else scaling
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scale
    if softcap is not None:  # Gemma 2
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, group, length, keys)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, :keys]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights.view(batch, kv_heads, group * length, keys), value)
    return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """grouped_query_attention, a decode token's by caprese's CPU kernel where it applies
    (one query, no soft cap, float32 or bf16, kernels built)."""
    if query.shape[2] == 1 and softcap is None:
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = cpu.decode_attention(query, key, value, attention_mask, scale)
        if out is not None:
            return out, None
    return grouped_query_attention(module, query, key, value, attention_mask, scaling, dropout,
                                   softcap, **kwargs)


for _name, _attention in ((GROUPED, grouped_query_attention), (DECODE, decode_attention)):
    AttentionInterface.register(_name, _attention)
    AttentionMaskInterface.register(_name, eager_mask)
