"""CapreseBlock: one gated MLP, its efficient method, and the low-rank path x L R.

    FF+(x) = FFhat(x) + x L R          L: D x r,  R: r x D,  R = 0 at start

Two decode forms compute the same thing:
- reference: the masked dense MLP plus (x L) R, differentiable, used for training and tests;
- fused (the paper's inference form): u = x [W1hat | L]; the gate multiplies only the first
  k entries of u; out = u [W2hat ; R]. Decode then runs exactly the efficient method's three
  matrix products, the low-rank path riding along inside them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from caprese.kernels import decode_linear, decode_rows_product, gpu_cats_decode, sparse_decode
from caprese.methods import FastWeights, Method
from caprese.methods.base import linear_rows
from caprese.phases import Phase, PhaseState


def init_left(hidden: int, rank: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """L must be nonzero (with R = 0, the gradient of R is (x L)^T g).

    N(0, 1/D) keeps x L at the scale of x per entry, like a standard linear init; orthogonal
    columns make x L an exact projection, which conditions the first steps of R's training.
    """
    left = torch.randn(hidden, rank, generator=generator) / math.sqrt(hidden)
    if kind == "orthogonal":
        left = torch.linalg.qr(left).Q
    return left


class CapreseBlock(nn.Module):
    """Replaces one model MLP; the original module lives on as `self.mlp`, untouched."""

    def __init__(
        self,
        mlp: nn.Module,
        method: Method,
        state: PhaseState,
        rank: int | None,
        init: str = "gaussian",
        generator: torch.Generator | None = None,
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        self.mlp = mlp
        self.layer_index = layer_index
        self.method = method
        self.phase_state = state
        self.fused = True
        self.sparse = True  # CATS: gather only the surviving rows when decoding one token
        self.dense_kernels = False  # one-token products by caprese.kernels (use_decode_kernels)
        weight = mlp.up_proj.weight
        hidden = weight.shape[1]
        if rank is None:
            self.L = self.R = None
        else:
            # float32 whatever the model's dtype: L and R are small, and Adam's updates at
            # end-to-end learning rates fall below bf16's resolution.
            left = init_left(hidden, rank, init, generator or torch.Generator())
            self.L = nn.Parameter(left.to(device=weight.device))
            self.R = nn.Parameter(torch.zeros(rank, hidden, device=weight.device))
        self.selection: torch.Tensor | None = None  # per-sample method state from the prompt
        self.batch_size: int | None = None
        self.fast: FastWeights | None = None
        self._shared_fast: tuple[tuple, FastWeights] | None = None

    # -- the pieces -------------------------------------------------------------------------
    def _dense_parts(self, x: torch.Tensor):
        """act(gate), up and their product: the original MLP's ops, in its order."""
        act_gate = self.mlp.act_fn(self.mlp.gate_proj(x))
        up = self.mlp.up_proj(x)
        return act_gate, up, act_gate * up

    def lowrank(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.L is None:
            return None
        return (x @ self.L.to(x.dtype)) @ self.R.to(x.dtype)

    def _select(self, act_gate, hidden, valid) -> None:
        self.selection = self.method.select(act_gate, hidden, valid)
        self.batch_size = hidden.shape[0]
        self.fast = None

    # -- phases -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = self.phase_state.phase
        if phase is Phase.DENSE:
            return self.mlp(x)
        if phase is Phase.PREFILL:
            return self._prefill(x)
        if phase is Phase.DECODE:
            return self._decode(x)
        return self._split(x)  # SPLIT or CAPTURE

    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        act_gate, up, hidden = self._dense_parts(x)
        self._select(act_gate, hidden, self.phase_state.valid)
        if self._fused_decode():
            self.fast = self._fast_weights()  # gathering is part of time to first token
        return self.mlp.down_proj(hidden)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_size is None:
            raise RuntimeError("decode before prefill: run the prompt through the model first")
        if x.shape[0] != self.batch_size:
            raise RuntimeError(
                f"decode batch of {x.shape[0]} after a prefill of {self.batch_size}; beam "
                "search and batch reordering are not supported: run a new prefill"
            )
        if self._fused_decode():
            return self._decode_fused(x)
        return self._decode_reference(x)

    def _fused_decode(self) -> bool:
        """The fused form, unless each sample's gathered matrices together outweigh the dense
        ones: B samples keeping k of D_FF neurons read B k / D_FF of the dense bytes, so from
        B k >= D_FF on (a batch of 2 at density 0.5) one masked dense pass reads less. That
        form computes the same values (tests hold the two equal)."""
        if not self.fused or torch.is_grad_enabled():
            return False
        if not self.uses_per_sample_weights():
            return True
        batch, kept = self.selection.shape
        return batch * kept < self.mlp.up_proj.weight.shape[0]

    def _compressed(self, act_gate, up, hidden) -> torch.Tensor:
        mask = self.method.keep_mask(self.selection, act_gate)
        return hidden if mask is None else act_gate * mask * up

    def _decode_reference(self, x: torch.Tensor) -> torch.Tensor:
        act_gate, up, hidden = self._dense_parts(x)
        out = self.mlp.down_proj(self._compressed(act_gate, up, hidden))
        extra = self.lowrank(x)
        return out if extra is None else out + extra

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        is_decode, act_gate, up, hidden = self._teacher_forced_parts(x)
        if self.phase_state.phase is Phase.CAPTURE:
            self._observe(x, act_gate, hidden, is_decode & self.phase_state.valid)
            return self.mlp.down_proj(hidden)
        compressed = self._compressed(act_gate, up, hidden)
        mixed = torch.where(is_decode[..., None], compressed, hidden)
        out = self.mlp.down_proj(mixed)
        extra = self.lowrank(x)
        if extra is None:
            return out
        return out + extra * is_decode[..., None].to(extra.dtype)

    def _observe(self, x, act_gate, hidden, continuation) -> None:
        """Hand the observer x and the dropped activations at continuation positions only.

        The mask is built for those rows alone, each with its own sample's selection: over
        the whole batch (prompt rows included) CATS' mask cost more than the statistics.
        hidden * (1 - mask) equals hidden - compressed exactly (the mask is 0 or 1).
        """
        sample = continuation.nonzero()[:, 0]
        state = None if self.selection is None else self.selection[sample]
        hidden_rows = hidden[continuation]
        mask = self.method.keep_mask(state, act_gate[continuation][:, None, :])
        if mask is None:
            dropped = torch.zeros_like(hidden_rows)
        else:
            dropped = hidden_rows * (1 - mask[:, 0])
        self.phase_state.observer(self, x[continuation], dropped)

    def _teacher_forced_parts(self, x: torch.Tensor):
        """Dense parts of the whole sequence, selecting from each sample's prompt positions.

        The selection sees positions up to the longest prompt only: the rest are no sample's
        prompt, and scoring them (GRIFFIN's float32 pass over S x D_FF) cost as much as
        the selection itself."""
        state = self.phase_state
        positions = torch.arange(x.shape[1], device=x.device)
        is_decode = positions[None, :] >= state.boundary[:, None]  # (B, S)
        act_gate, up, hidden = self._dense_parts(x)
        prompt = slice(0, int(state.boundary.max()))
        self._select(act_gate[:, prompt], hidden[:, prompt], (state.valid & ~is_decode)[:, prompt])
        return is_decode, act_gate, up, hidden

    # -- fused fast path --------------------------------------------------------------------
    def _fast_weights(self) -> FastWeights:
        """The method's decode weights with L appended to up and R to down (rows)."""
        if self.uses_per_sample_weights():  # rebuilt at every prefill
            return self._append_lowrank(self.method.gather(self.mlp, self.selection))
        # Shared matrices: built once and cached while the weights, L and R are unchanged
        # (version counters track in-place optimizer updates).
        key = tuple(
            (p._version, p.data_ptr(), p.device, p.dtype)
            for p in (self.mlp.up_proj.weight, self.L, self.R)
            if p is not None
        )
        if self._shared_fast is None or self._shared_fast[0] != key:
            gathered = self.method.gather(self.mlp, self.selection)
            self._shared_fast = (key, self._append_lowrank(gathered))
        return self._shared_fast[1]

    def uses_per_sample_weights(self) -> bool:
        """GRIFFIN below density 1 gathers each sample's own matrices; others share them."""
        return self.method.per_sample_weights and self.selection is not None

    @torch.no_grad()
    def _append_lowrank(self, fast: FastWeights) -> FastWeights:
        if self.L is None:
            return fast
        dtype = fast.up.dtype
        left_rows, right = self.L.t().to(dtype), self.R.to(dtype)
        if fast.up.dim() == 3:
            batch = fast.up.shape[0]
            left_rows = left_rows.expand(batch, -1, -1)
            right = right.expand(batch, -1, -1)
        up_bias = fast.up_bias
        if up_bias is not None:
            up_bias = torch.cat(
                [up_bias, up_bias.new_zeros(*up_bias.shape[:-1], self.L.shape[1])], dim=-1
            )
        return FastWeights(
            gate=fast.gate,
            gate_bias=fast.gate_bias,
            up=torch.cat([fast.up, left_rows], dim=-2),
            up_bias=up_bias,
            down_rows=torch.cat([fast.down_rows, right], dim=-2),
        )

    def _sparse_decode(self, x: torch.Tensor, act_gate: torch.Tensor, tau: torch.Tensor,
                       fast: FastWeights) -> torch.Tensor | None:
        """CATS reading only the surviving rows: the CPU kernel (one token) or Triton's (one
        token per sample, CUDA); None where neither applies (then the masked dense form)."""
        if (not self.sparse or x.shape[1] != 1 or fast.up_bias is not None
                or self.mlp.down_proj.bias is not None):
            return None
        if _triton_device(x):
            cats_decode = gpu_cats_decode()
            if cats_decode is not None:
                return cats_decode(x, act_gate, tau, fast.up, fast.down_rows)
        elif x.device.type == "cpu" and x.shape[0] == 1:
            return sparse_decode(x, act_gate, tau[0], fast.up, fast.down_rows)
        return None

    def _decode_fused(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is None:
            self.fast = self._fast_weights()
        fast = self.fast
        act_gate = self.mlp.act_fn(self._linear(x, fast.gate, fast.gate_bias))
        tau = self.method.gate_threshold(self.selection)
        if tau is not None:
            out = self._sparse_decode(x, act_gate, tau, fast)
            if out is not None:
                return out
            act_gate = act_gate * (act_gate.abs() > tau[:, None, None])
        up = self._linear(x, fast.up, fast.up_bias)
        kept = act_gate.shape[-1]
        if up.shape[-1] == kept:
            hidden = act_gate * up
        else:  # the gate multiplies the first k entries; the last r are x L
            hidden = up
            hidden[..., :kept].mul_(act_gate)
        return self._down(hidden, fast)

    def _down(self, hidden: torch.Tensor, fast: FastWeights) -> torch.Tensor:
        """hidden @ down_rows + bias, by the one-token kernel when it applies."""
        bias = self.mlp.down_proj.bias
        if self.dense_kernels and hidden.shape[0] == 1:
            rows = fast.down_rows.reshape(fast.down_rows.shape[-2:])
            out = decode_rows_product(hidden, rows, bias)
            if out is not None:
                return out
        return linear_rows(hidden, fast.down_rows.transpose(-2, -1), bias)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        """linear_rows, or the one-token kernel (per-sample weights of a batch of one too)."""
        if self.dense_kernels and x.shape[0] == 1:
            if bias is not None and bias.dim() == 2:
                bias = bias[0]
            out = decode_linear(x, weight.reshape(weight.shape[-2:]), bias)
            if out is not None:
                return out
        return linear_rows(x, weight, bias)


def _triton_device(x: torch.Tensor) -> bool:
    """Where Triton's CATS kernel runs (a function, so tests can route the CPU through it)."""
    return x.device.type == "cuda"
