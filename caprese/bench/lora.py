"""The paper's LoRA baseline (eq. 11): a low-rank update on each sparsified projection.

Parameter-matched to Caprese: three adapters of rank r' on (D x D_FF) matrices cost
3 r' (D + D_FF) parameters, equal to Caprese's 2 D r when r' = 2 D r / (3 (D + D_FF)).
Unlike Caprese it cannot ride inside the pruned matrices: each projection gets two more
sequential products (x A) B, which is the latency the paper measures (Table 5). It plugs
into the blocks through their extension point, CapreseBlock.update (a ProjectionUpdate).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from caprese.adapter import attach, blocks
from caprese.block import ProjectionUpdate
from caprese.config import CapreseConfig


def matched_rank(hidden: int, d_ff: int, caprese_rank: int) -> int:
    return max(1, round(2 * hidden * caprese_rank / (3 * (hidden + d_ff))))


class LoraUpdate(ProjectionUpdate):
    """(x A) B added to the gate and up projections and (h A) B to the down projection."""

    def __init__(self, hidden: int, d_ff: int, rank: int, generator: torch.Generator,
                 like: torch.Tensor) -> None:
        super().__init__()

        def param(*shape):
            values = torch.randn(*shape, generator=generator) * 0.01
            return nn.Parameter(values.to(device=like.device, dtype=like.dtype))

        self.gate_a, self.gate_b = param(hidden, rank), param(rank, d_ff)
        self.up_a, self.up_b = param(hidden, rank), param(rank, d_ff)
        self.down_a, self.down_b = param(d_ff, rank), param(rank, hidden)
        self._gathered: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def prepare(self, neurons: torch.Tensor) -> None:
        """B of gate and up and A of down, restricted to each sample's kept neurons."""
        self._gathered = (neurons, (self.gate_b[:, neurons].permute(1, 0, 2),
                                    self.up_b[:, neurons].permute(1, 0, 2),
                                    self.down_a[neurons]))

    def _factors(self, neurons: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if neurons is None:
            return self.gate_b, self.up_b, self.down_a
        if self._gathered is None or self._gathered[0] is not neurons:
            self.prepare(neurons)
        return self._gathered[1]

    def project(self, name: str, inputs: torch.Tensor, neurons: torch.Tensor | None
                ) -> torch.Tensor:
        gate_b, up_b, down_a = self._factors(neurons)
        if name == "gate":
            return torch.matmul(inputs @ self.gate_a, gate_b)
        if name == "up":
            return torch.matmul(inputs @ self.up_a, up_b)
        return torch.matmul(inputs, down_a) @ self.down_b


def attach_lora(model: nn.Module, config: CapreseConfig, caprese_rank: int,
                seed: int = 0) -> nn.Module:
    """Attach the method alone, then give its blocks parameter-matched LoRA updates."""
    attach(model, dataclasses.replace(config, rank=None))
    generator = torch.Generator().manual_seed(seed)
    for block in blocks(model).values():
        d_ff, hidden = block.mlp.up_proj.weight.shape
        block.update = LoraUpdate(hidden, d_ff, matched_rank(hidden, d_ff, caprese_rank),
                                  generator, block.mlp.up_proj.weight)
    return model
