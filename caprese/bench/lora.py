"""The paper's LoRA baseline (eq. 11): a low-rank update on each sparsified projection.

Parameter-matched to Caprese: three adapters of rank r' on (D x D_FF) matrices cost
3 r' (D + D_FF) parameters, equal to Caprese's 2 D r when r' = 2 D r / (3 (D + D_FF)).
Unlike Caprese it cannot ride inside the pruned matrices: each projection gets two more
sequential products (x A) B, which is the latency the paper measures (Table 5).
"""

from __future__ import annotations

import torch
from torch import nn

from caprese.adapter import attach, blocks, handle_of
from caprese.block import CapreseBlock
from caprese.config import CapreseConfig
from caprese.families import set_mlp


def matched_rank(hidden: int, d_ff: int, caprese_rank: int) -> int:
    return max(1, round(2 * hidden * caprese_rank / (3 * (hidden + d_ff))))


class LoraBlock(CapreseBlock):
    """GRIFFIN/CATS block whose gate, up and down projections carry LoRA updates in decode."""

    def __init__(self, block: CapreseBlock, rank: int, generator: torch.Generator) -> None:
        super().__init__(block.mlp, block.method, block.phase_state, None,
                         layer_index=block.layer_index)
        weight = block.mlp.up_proj.weight
        d_ff, hidden = weight.shape

        def param(*shape):
            values = torch.randn(*shape, generator=generator) * 0.01
            return nn.Parameter(values.to(device=weight.device, dtype=weight.dtype))

        self.gate_a, self.gate_b = param(hidden, rank), param(rank, d_ff)
        self.up_a, self.up_b = param(hidden, rank), param(rank, d_ff)
        self.down_a, self.down_b = param(d_ff, rank), param(rank, hidden)
        self.lora_gathered: tuple[torch.Tensor, ...] | None = None

    def _fast_weights(self):
        fast = super()._fast_weights()
        kept = self.selection
        if not self.uses_per_sample_weights():  # shared weights (CATS or density 1)
            self.lora_gathered = (self.gate_b, self.up_b, self.down_a)
        else:  # GRIFFIN: the kept neurons' columns of B and rows of A_down, per sample
            self.lora_gathered = (self.gate_b[:, kept].permute(1, 0, 2),
                                  self.up_b[:, kept].permute(1, 0, 2), self.down_a[kept])
        return fast

    def _decode_fused(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is None:
            self.fast = self._fast_weights()
        fast = self.fast
        gate_b, up_b, down_a = self.lora_gathered
        gate = self._linear(x, fast.gate, fast.gate_bias) + torch.matmul(x @ self.gate_a, gate_b)
        act_gate = self.mlp.act_fn(gate)
        tau = self.method.gate_threshold(self.selection)
        if tau is not None:
            act_gate = act_gate * (act_gate.abs() > tau[:, None, None])
        up = self._linear(x, fast.up, fast.up_bias) + torch.matmul(x @ self.up_a, up_b)
        hidden = act_gate * up
        return self._down(hidden, fast) + torch.matmul(hidden, down_a) @ self.down_b

    def _decode_reference(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.mlp.gate_proj(x) + (x @ self.gate_a) @ self.gate_b
        up = self.mlp.up_proj(x) + (x @ self.up_a) @ self.up_b
        act_gate = self.mlp.act_fn(gate)
        mask = self.method.keep_mask(self.selection, act_gate)
        hidden = act_gate * up if mask is None else act_gate * mask * up
        return self.mlp.down_proj(hidden) + (hidden @ self.down_a) @ self.down_b


def attach_lora(model: nn.Module, config: CapreseConfig, caprese_rank: int,
                seed: int = 0) -> nn.Module:
    """Attach the method alone, then give its blocks parameter-matched LoRA updates."""
    import dataclasses

    attach(model, dataclasses.replace(config, rank=None))
    generator = torch.Generator().manual_seed(seed)
    handle = handle_of(model)
    for index, block in list(blocks(model).items()):
        d_ff, hidden = block.mlp.up_proj.weight.shape
        lora = LoraBlock(block, matched_rank(hidden, d_ff, caprese_rank), generator)
        set_mlp(model, index, lora)
        handle.blocks[index] = lora
    return model
