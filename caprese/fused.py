"""The fused decode form of a CapreseBlock (the paper's inference form), kept apart from
the block's phases: u = x [W1hat | L]; the gate multiplies only the first k entries of u;
out = u [W2hat ; R]. Decode then runs exactly the efficient method's three matrix products,
the low-rank path riding along inside them.

Its weights live in layouts (kernels/layout.py) that take the place of W1's and W2's storage,
built once per attach; GRIFFIN's per-sample matrices are gathered once per prompt. The block
(block.py) mixes this class in and owns the state it reads: mlp, method, L, R, update,
selection, phase_state and the caches initialised in its constructor.
"""

from __future__ import annotations

import torch

from caprese.kernels import layout
from caprese.kernels.select import select_backend
from caprese.methods import FastWeights


class FusedDecode:
    """The fused form's weights and its decode step, for CapreseBlock."""

    def _fast_weights(self) -> FastWeights:
        """The method's decode weights with L appended to up and R to down (rows)."""
        if self.uses_per_sample_weights():  # rebuilt at every prefill
            if self.update is not None:
                self.update.prepare(self.selection)
            self.prepare_layout()
            return self._gather_with_lowrank()
        return self.shared_weights()

    def uses_per_sample_weights(self) -> bool:
        """GRIFFIN below density 1 gathers each sample's own matrices; others share them."""
        return self.method.per_sample_weights and self.selection is not None

    def shares_weights(self) -> bool:
        """Whether every prompt decodes with the same weights (all but GRIFFIN below 1)."""
        return not self.method.per_sample_weights or self.method.density >= 1

    def _needs_layout(self) -> bool:
        """Shared decode weights need their own layout when L and R ride along or when a
        sparse kernel reads rows of W2^T (CATS below density 1)."""
        return self.L is not None or (self.method.reads_down_rows and self.method.density < 1)

    def _rows_buffer(self, name: str, extra: int, transposed: bool) -> torch.Tensor:
        """kernels/layout.rows_buffer for the MLP's `name` projection; detach undoes it."""
        self._moved.add(name)
        return layout.rows_buffer(getattr(self.mlp, name), extra, transposed)

    @torch.no_grad()
    def prepare_layout(self, batch: int | None = None) -> None:
        """Per-sample gathering copies rows of W2^T: stored that way (in place of W2, once
        per attach), each kept neuron is one contiguous row copy rather than a strided
        column read (7x faster for the 1.5B model's fp32 W2: benchmarks/per_prompt_work.py);
        prefill multiplies at the same speed through the transposed view. With `batch`, the
        gathered matrices of that many samples are allocated (and touched) now, so that no
        prompt pays the page faults of fresh memory."""
        if self.replacement is not None:
            return  # decodes with its own 4-bit copy: no layout to build
        if self.method.per_sample_weights and self.method.density < 1:
            self._rows_buffer("down_proj", 0, transposed=True)
            if batch is not None:
                weight = self.mlp.up_proj.weight
                kept = self.method.kept(weight.shape[0])
                rows = kept + (0 if self.L is None else self.L.shape[1])
                self._gathered = FastWeights(
                    gate=weight.new_zeros(batch, kept, weight.shape[1]), gate_bias=None,
                    up=weight.new_zeros(batch, rows, weight.shape[1]), up_bias=None,
                    down_rows=weight.new_zeros(batch, rows, weight.shape[1]))
        elif self.shares_weights():
            self.shared_weights()

    @torch.no_grad()
    def shared_weights(self) -> FastWeights:
        """The decode weights every prompt shares (all methods but GRIFFIN below density 1).

        Built once per attach (kernels/layout.py: the layout takes the place of W1's and
        W2's storage, so no second copy exists) and cached: a later call rewrites only the r
        rows of L and R, and only when an optimizer changed them (version counters)."""
        if not self._needs_layout():
            return self.method.gather(self.mlp, None)
        up_proj, down_proj = self.mlp.up_proj, self.mlp.down_proj
        rank = 0 if self.L is None else self.L.shape[1]
        key = None if self.L is None else (self.L._version, self.R._version, self.L.data_ptr(),
                                           self.R.data_ptr())
        cached = self._shared_fast
        if (cached is not None and layout.lives_in(up_proj, cached[1].up, False)
                and layout.lives_in(down_proj, cached[1].down_rows, True)):
            if cached[0] == key:
                return cached[1]
            fast = cached[1]
        else:
            self._shared_fast = self.fast = None  # let the old buffers go before new ones
            up_bias = up_proj.bias
            if up_bias is not None and rank:
                up_bias = torch.cat([up_bias, up_bias.new_zeros(rank)])
            fast = FastWeights(
                gate=self.mlp.gate_proj.weight, gate_bias=self.mlp.gate_proj.bias,
                up=self._rows_buffer("up_proj", rank, transposed=False), up_bias=up_bias,
                down_rows=self._rows_buffer("down_proj", rank, transposed=True))
        if rank:
            fast.up[-rank:].copy_(self.L.t())
            fast.down_rows[-rank:].copy_(self.R)
        self._shared_fast = (key, fast)
        return fast

    def release_layouts(self) -> None:
        """Give W1 and W2 their own contiguous storage back (detach)."""
        self._shared_fast = self.fast = self._gathered = None
        for name in sorted(self._moved):
            layout.restore(getattr(self.mlp, name))
        self._moved.clear()

    @torch.no_grad()
    def _gather_with_lowrank(self) -> FastWeights:
        """Each sample's gathered matrices (B, k + r, D), L^T and R filling the last r rows."""
        rank = 0 if self.L is None else self.L.shape[1]
        fast = self.method.gather(self.mlp, self.selection, extra=rank, reuse=self._gathered)
        self._gathered = fast
        if rank:
            fast.up[:, -rank:] = self.L.t()
            fast.down_rows[:, -rank:] = self.R
        return fast

    def _decode_fused(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is None:
            self.fast = self._fast_weights()
        fast = self.fast
        backend = select_backend(x.device, self.phase_state.decode.kernels)
        neurons = self.selection if fast.up.dim() == 3 else None
        gate = self._projected("gate", backend.linear(x, fast.gate, fast.gate_bias), x, neurons)
        act_gate = self.mlp.act_fn(gate)
        tau = self.method.gate_threshold(self.selection)
        if tau is not None:
            if (self.update is None and fast.up_bias is None
                    and self.mlp.down_proj.bias is None):
                out = backend.cats_mlp(x, act_gate, tau, fast.up, fast.down_rows)
                if out is not None:
                    return out
            act_gate = act_gate * (act_gate.abs() > tau[:, None, None])
        up = self._projected("up", backend.linear(x, fast.up, fast.up_bias), x, neurons)
        kept = act_gate.shape[-1]
        if up.shape[-1] == kept:
            hidden = act_gate * up
        else:  # the gate multiplies the first k entries; the last r are x L
            hidden = up
            hidden[..., :kept].mul_(act_gate)
        out = backend.rows_product(hidden, fast.down_rows, self.mlp.down_proj.bias)
        return self._projected("down", out, hidden, neurons)
