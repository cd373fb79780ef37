"""GRIFFIN (Dong et al., 2024): keep the neurons the prompt uses most, per sequence.

During prefill z = act(x Wg) * (x W1) is computed anyway. Each prompt token's row of z is
scaled to unit l2 norm (so no single token dominates), neuron j scores the l2 norm of its
column over the prompt, and the top k = density * D_FF neurons are kept for every generated
token. Gathering their rows/columns gives smaller dense matrices: a real speedup.
"""

from __future__ import annotations

import torch

from caprese.methods.base import FastWeights, Method

# Tokens squared at a time on a CPU: an fp32 block of this many bytes stays in a core's
# cache, where squaring the whole prompt at once wrote and re-read an fp32 copy of z (4x
# faster in chunks: 52 -> 9.6 ms per layer of the 1.5B model at 2048 tokens in bf16, AMX
# Xeon). A GPU squares the whole prompt at once: there each chunk costs kernel launches
# (a 14B model's 2048 tokens would be 56 chunks per layer), not memory traffic.
_SQUARES_BYTES = 2 << 20


def squared_scores(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """griffin_scores squared, (B, D_FF) in fp32: a sum over tokens, so chunks of a prompt
    add up (a long prompt fed in pieces, or reselection's later tokens)."""
    batch, length, d_ff = hidden.shape
    on_cpu = hidden.device.type == "cpu"
    rows = max(1, _SQUARES_BYTES // (4 * d_ff * batch) if on_cpu else length)
    total = hidden.new_zeros(batch, d_ff, dtype=torch.float32)
    for start in range(0, length, rows):
        squares = hidden[:, start:start + rows].to(torch.float32, copy=True).square_()
        weights = valid[:, start:start + rows] / squares.sum(dim=-1).clamp_min(1e-24)
        total.add_(torch.bmm(weights[:, None, :].to(squares.dtype), squares)[:, 0])
    return total


def griffin_scores(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Neuron scores (B, D_FF) from z (B, S, D_FF), ignoring positions where valid is False.

    score_j^2 = sum_t valid_t z_tj^2 / ||z_t||^2: squares once, then one weighted sum over
    the prompt as a matrix product. Normalising z first and taking column norms gave the
    same scores in 4x the time (109 vs 26 ms per layer of the 1.5B model at 2048 tokens,
    `python benchmarks/per_prompt_work.py`), part of time to first token."""
    return squared_scores(hidden, valid).sqrt()


class Griffin(Method):
    name = "griffin"
    per_sample_weights = True
    reselects = True

    def kept(self, d_ff: int) -> int:
        return max(1, round(self.density * d_ff))

    def select(self, act_gate, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        return self.select_top(griffin_scores(hidden, valid))

    def scores(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-sample neuron scores (B, D_FF): reselection adds later tokens' in quadrature."""
        return griffin_scores(hidden, valid)

    def streams(self, dtype: torch.dtype) -> bool:
        return True

    def accumulate(self, stream, act_gate, hidden, valid) -> torch.Tensor:
        squares = squared_scores(hidden, valid)
        return squares if stream is None else stream + squares

    def finish(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = stream.sqrt()
        return scores, self.select_top(scores)

    def select_top(self, scores: torch.Tensor) -> torch.Tensor | None:
        d_ff = scores.shape[-1]
        k = self.kept(d_ff)
        if k == d_ff:
            return None
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

    @torch.no_grad()  # the fused form's weights: it computes no gradients
    def gather(self, mlp, state, extra: int = 0, reuse: FastWeights | None = None
               ) -> FastWeights:
        """Each sample's kept rows of Wg, W1 and W2^T, copied once into (B, k + extra, D)
        matrices: part of time to first token (1.2 GB for the 1.5B model in fp32). The last
        `extra` rows of up and down are left for the block's L and R. `reuse`, the previous
        prompt's matrices, is written over when its shapes fit, so that no prompt waits for
        fresh memory (the allocator may hand back pages that fault on first touch)."""
        if state is None:
            return super().gather(mlp, state)
        batch, kept = state.shape

        def rows(weight: torch.Tensor, extra_rows: int, old: torch.Tensor | None
                 ) -> torch.Tensor:
            shape = (batch, kept + extra_rows, weight.shape[1])
            fits = (old is not None and old.shape == shape and old.dtype == weight.dtype
                    and old.device == weight.device)
            out = old if fits else weight.new_empty(shape)
            for sample, neurons in enumerate(state):  # one row copy per kept neuron
                torch.index_select(weight, 0, neurons, out=out[sample, :kept])
            return out

        def bias(linear, extra_rows: int) -> torch.Tensor | None:
            if linear.bias is None:
                return None
            return torch.cat([linear.bias[state], linear.bias.new_zeros(batch, extra_rows)], -1)

        old = reuse or FastWeights(None, None, None, None, None)
        return FastWeights(
            gate=rows(mlp.gate_proj.weight, 0, old.gate),
            gate_bias=bias(mlp.gate_proj, 0),
            up=rows(mlp.up_proj.weight, extra, old.up),
            up_bias=bias(mlp.up_proj, extra),
            down_rows=rows(mlp.down_proj.weight.t(), extra, old.down_rows),
        )
