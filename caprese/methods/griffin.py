"""GRIFFIN (Dong et al., 2024): keep the neurons the prompt uses most, per sequence.

During prefill z = act(x Wg) * (x W1) is computed anyway. Each prompt token's row of z is
scaled to unit l2 norm (so no single token dominates), neuron j scores the l2 norm of its
column over the prompt, and the top k = density * D_FF neurons are kept for every generated
token. Gathering their rows/columns gives smaller dense matrices: a real speedup.
"""

from __future__ import annotations

import torch

from caprese.methods.base import FastWeights, Method


def griffin_scores(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Neuron scores (B, D_FF) from z (B, S, D_FF), ignoring positions where valid is False."""
    z = hidden.float()
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    z = z * valid[..., None]
    return z.norm(dim=1)


class Griffin(Method):
    name = "griffin"
    per_sample_weights = True

    def kept(self, d_ff: int) -> int:
        return max(1, round(self.density * d_ff))

    def select(self, act_gate, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        d_ff = hidden.shape[-1]
        k = self.kept(d_ff)
        if k == d_ff:
            return None
        scores = griffin_scores(hidden, valid)
        # Sorted indices keep the gathered matrices in the original neuron order.
        return scores.topk(k, dim=-1).indices.sort(dim=-1).values

    def keep_mask(self, state, act_gate: torch.Tensor) -> torch.Tensor | None:
        if state is None:
            return None
        mask = torch.zeros(
            state.shape[0], act_gate.shape[-1], dtype=act_gate.dtype, device=act_gate.device
        )
        mask.scatter_(1, state, 1.0)
        return mask[:, None, :]

    def gather(self, mlp, state) -> FastWeights:
        if state is None:
            return super().gather(mlp, state)

        def rows(weight: torch.Tensor) -> torch.Tensor:  # (D_FF, D) -> (B, k, D)
            if weight.is_contiguous():  # row copies: several times faster than weight[state]
                return torch.stack([weight.index_select(0, kept) for kept in state])
            return weight[state]

        def bias(linear) -> torch.Tensor | None:
            return None if linear.bias is None else linear.bias[state]

        return FastWeights(
            gate=rows(mlp.gate_proj.weight),
            gate_bias=bias(mlp.gate_proj),
            up=rows(mlp.up_proj.weight),
            up_bias=bias(mlp.up_proj),
            down_rows=rows(mlp.down_proj.weight.t()),
        )
