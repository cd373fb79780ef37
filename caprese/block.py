"""CapreseBlock: one gated MLP, its efficient method, and the low-rank path x L R.

    FF+(x) = FFhat(x) + x L R          L: D x r,  R: r x D,  R = 0 at start

Two decode forms compute the same thing:
- reference: the masked dense MLP plus (x L) R, differentiable, used for training and tests;
- fused (the paper's inference form): u = x [W1hat | L]; the gate multiplies only the first
  k entries of u; out = u [W2hat ; R]. Decode then runs exactly the efficient method's three
  matrix products, the low-rank path riding along inside them. Its weights are built without
  gradients, so it refuses to run where autograd would need them.
The fused form's weights and step are in fused.py. Which form, and which backend multiplies
(kernels/select.py), is the model's DecodeOptions, set in one place (caprese.set_decode); the
phase comes from the model's phase hook.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from caprese.fused import FusedDecode
from caprese.kernels.select import KERNELS
from caprese.methods import FastWeights, Method


class Phase(enum.Enum):
    DENSE = "dense"
    PREFILL = "prefill"
    DECODE = "decode"
    SPLIT = "split"
    CAPTURE = "capture"
    RESCORE = "rescore"  # generated tokens through the dense MLP, their scores added (rho)


@dataclass(frozen=True)
class DecodeOptions:
    """How decode tokens are computed; every choice gives the same values up to rounding."""

    fused: bool = True  # the paper's inference form; False: masked dense MLP + (x L) R
    kernels: str = "auto"  # a kernels.select.KERNELS name

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise ValueError(f"unknown kernels {self.kernels!r}; choose one of "
                             f"{', '.join(KERNELS)}")


@dataclass
class PhaseState:
    """Shared by all blocks of one model; the phase is written only by the phase hook."""

    phase: Phase = Phase.DENSE
    valid: torch.Tensor | None = None  # (B, S) bool: real tokens of the current input
    boundary: torch.Tensor | None = None  # (B,) first continuation position (SPLIT)
    forced: Phase | None = None
    teacher_depth: int = 0
    prompt_chunks: bool = False  # phases.prefill: PREFILL forwards are chunks of one prompt
    # CAPTURE: observer(block, x, FF(x) - FFhat(x)) on continuation rows
    observer: Callable | None = None
    decode: DecodeOptions = field(default_factory=DecodeOptions)


class ProjectionUpdate(nn.Module):
    """Extension point: a term a block adds to its gate, up and down projections when it
    decodes (both forms), such as the paper's LoRA baseline (caprese.bench.lora). A block
    with an update decodes CATS by the masked form, never by a sparse kernel."""

    def prepare(self, neurons: torch.Tensor) -> None:
        """Called when the block gathers a prompt's per-sample decode weights (time to first
        token), with the neurons (B, k) they keep: gather what `project` will need."""

    def project(self, name: str, inputs: torch.Tensor, neurons: torch.Tensor | None
                ) -> torch.Tensor:
        """What to add to projection `name` ("gate", "up" or "down") of `inputs`. `neurons`
        (B, k) are the MLP neurons each sample's gathered decode weights keep (GRIFFIN's
        fused form), or None when the projections span all D_FF neurons."""
        raise NotImplementedError


def init_left(hidden: int, rank: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """L must be nonzero (with R = 0, the gradient of R is (x L)^T g).

    N(0, 1/D) keeps x L at the scale of x per entry, like a standard linear init; orthogonal
    columns make x L an exact projection, which conditions the first steps of R's training.
    """
    left = torch.randn(hidden, rank, generator=generator) / math.sqrt(hidden)
    if kind == "orthogonal":
        left = torch.linalg.qr(left).Q
    return left


class CapreseBlock(FusedDecode, nn.Module):
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
        self.update: ProjectionUpdate | None = None  # see ProjectionUpdate
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
        # a quantizing method's own copy of the MLP (FFhat), beside the dense one prefill uses
        self.replacement = method.replacement(mlp)
        self.selection: torch.Tensor | None = None  # per-sample method state from the prompt
        self.scores: torch.Tensor | None = None  # (B, D_FF), for a method that reselects
        self.stream = None  # a prompt in chunks: what the method has seen of it so far
        self.batch_size: int | None = None
        self.fast: FastWeights | None = None  # the fused form's weights for this prompt
        self._shared_fast: tuple[tuple, FastWeights] | None = None
        self._moved: set[str] = set()  # projections stored in a decode layout (restored)
        self._gathered: FastWeights | None = None  # the last prompt's, written over next

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
        if self.method.reselects:
            self.scores = self.method.scores(hidden, valid)
            self.selection = self.method.select_top(self.scores)
        else:
            self.selection = self.method.select(act_gate, hidden, valid)
        self.batch_size = hidden.shape[0]
        self.fast = None

    def _rescore(self, x: torch.Tensor) -> torch.Tensor:
        """Generated tokens through the dense MLP (output exactly the original's); their
        scores join the prompt's in quadrature, s = sqrt(s^2 + s_new^2), which equals the
        scores of all tokens so far, and the neurons are selected again."""
        act_gate, up, hidden = self._dense_parts(x)
        if self.scores is not None:
            new = self.method.scores(hidden, self.phase_state.valid)
            self.scores = (self.scores.square() + new.square()).sqrt()
            self.selection = self.method.select_top(self.scores)
            self.fast = None  # gathered again at the next decode step
        return self.mlp.down_proj(hidden)

    def keep_samples(self, index: torch.Tensor) -> None:
        """Keep only the samples at `index` of the prompt batch (generation retires the
        samples that have ended): their selection or threshold, and no stale decode weights
        (per-sample matrices are gathered again for the samples left, when that pays)."""
        if self.batch_size is None:
            return
        if self.selection is not None:
            self.selection = self.selection[index.to(self.selection.device)]
        if self.scores is not None:
            self.scores = self.scores[index.to(self.scores.device)]
        self.batch_size = len(index)
        if self.uses_per_sample_weights():
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
        if phase is Phase.RESCORE:
            return self._rescore(x)
        return self._split(x)  # SPLIT or CAPTURE

    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        act_gate, up, hidden = self._dense_parts(x)
        if self.phase_state.prompt_chunks:  # phases.prefill calls finish_prompt at the end
            self.stream = self.method.accumulate(self.stream, act_gate, hidden,
                                                 self.phase_state.valid)
            self.batch_size = hidden.shape[0]
        else:
            self._select(act_gate, hidden, self.phase_state.valid)
            self._gather_for_prompt()
        return self.mlp.down_proj(hidden)

    def finish_prompt(self) -> None:
        """After a prompt's last chunk: select from all of it, as one PREFILL would."""
        self.scores, self.selection = self.method.finish(self.stream)
        self.stream, self.fast = None, None
        self._gather_for_prompt()

    def _gather_for_prompt(self) -> None:
        if (self.replacement is None and self.phase_state.decode.fused
                and self._gathers_for_fused()):
            self.fast = self._fast_weights()  # gathering is part of time to first token

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_size is None:
            raise RuntimeError("decode before prefill: run the prompt through the model first")
        if x.shape[0] != self.batch_size:
            raise RuntimeError(
                f"decode batch of {x.shape[0]} after a prefill of {self.batch_size}; beam "
                "search and batch reordering are not supported: run a new prefill"
            )
        if self.replacement is not None:  # no fused form: 4-bit W1 takes no extra columns
            return self._decode_replaced(x)
        if not (self.phase_state.decode.fused and self._gathers_for_fused()):
            return self._decode_reference(x)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._trained()):
            raise RuntimeError(
                "the fused decode form computes no gradients: decode under torch.no_grad(), "
                "or use the differentiable form with caprese.set_decode(model, fused=False)"
            )
        return self._decode_fused(x)

    def _trained(self) -> list[nn.Parameter]:
        params = [p for p in (self.L, self.R) if p is not None]
        return params + ([] if self.update is None else list(self.update.parameters()))

    def _gathers_for_fused(self) -> bool:
        """Whether the fused form's gathered matrices cost less to read than the dense ones:
        B samples keeping k of D_FF neurons each read B k / D_FF of the dense bytes, so from
        B k >= D_FF on (a batch of 2 at density 0.5) the masked reference form, which reads
        the dense weights once, is the faster way to the same values."""
        if not self.uses_per_sample_weights():
            return True
        batch, kept = self.selection.shape
        return batch * kept < self.mlp.up_proj.weight.shape[0]

    def _compressed(self, act_gate, up, hidden) -> torch.Tensor:
        mask = self.method.keep_mask(self.selection, act_gate)
        return hidden if mask is None else act_gate * mask * up

    def _projected(self, name: str, value: torch.Tensor, inputs: torch.Tensor,
                   neurons: torch.Tensor | None = None) -> torch.Tensor:
        """value plus the projection update's term (see ProjectionUpdate), if there is one."""
        if self.update is None:
            return value
        return value + self.update.project(name, inputs, neurons)

    def _decode_reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.update is None:
            act_gate, up, hidden = self._dense_parts(x)
        else:
            act_gate = self.mlp.act_fn(self._projected("gate", self.mlp.gate_proj(x), x))
            up = self._projected("up", self.mlp.up_proj(x), x)
            hidden = act_gate * up
        compressed = self._compressed(act_gate, up, hidden)
        out = self._projected("down", self.mlp.down_proj(compressed), compressed)
        extra = self.lowrank(x)
        return out if extra is None else out + extra

    def _decode_replaced(self, x: torch.Tensor) -> torch.Tensor:
        if self.update is not None:
            raise NotImplementedError("a quantizing method takes the low-rank path x L R only")
        out = self.replacement(x)
        extra = self.lowrank(x)
        return out if extra is None else out + extra

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        is_decode, act_gate, up, hidden = self._teacher_forced_parts(x)
        if self.phase_state.phase is Phase.CAPTURE:
            self._observe(x, act_gate, hidden, is_decode & self.phase_state.valid)
            return self.mlp.down_proj(hidden)
        if self.replacement is not None:
            out = torch.where(is_decode[..., None], self.replacement(x),
                              self.mlp.down_proj(hidden))
        else:
            compressed = self._compressed(act_gate, up, hidden)
            mixed = torch.where(is_decode[..., None], compressed, hidden)
            out = self.mlp.down_proj(mixed)
        extra = self.lowrank(x)
        if extra is None:
            return out
        return out + extra * is_decode[..., None].to(extra.dtype)

    def _observe(self, x, act_gate, hidden, continuation) -> None:
        """Hand the observer x and FF(x) - FFhat(x) at continuation positions only.

        For a masking method that difference is the dropped activations times W2 (the down
        bias cancels). The mask is built for those rows alone, each with its own sample's
        selection: over the whole batch (prompt rows included) CATS' mask cost more than the
        statistics. hidden * (1 - mask) equals hidden - compressed exactly (mask is 0 or 1).
        """
        rows = x[continuation]
        if self.replacement is not None:
            dense = self.mlp.down_proj(hidden[continuation])
            self.phase_state.observer(self, rows, dense - self.replacement(rows))
            return
        sample = continuation.nonzero()[:, 0]
        state = None if self.selection is None else self.selection[sample]
        hidden_rows = hidden[continuation]
        mask = self.method.keep_mask(state, act_gate[continuation][:, None, :])
        if mask is None:
            dropped = torch.zeros_like(hidden_rows)
        else:
            dropped = hidden_rows * (1 - mask[:, 0])
        self.phase_state.observer(self, rows, dropped @ self.mlp.down_proj.weight.t())

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
