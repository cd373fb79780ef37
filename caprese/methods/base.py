"""The interface every efficient method implements, and the fast-decode weight bundle."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FastWeights:
    """Weights the fast decode path multiplies with, in nn.Linear layout (out, in).

    Shared weights are 2-D; per-sample weights (GRIFFIN's gathered neurons) carry a leading
    batch dimension. `down_rows` is the transposed down projection, (..., k, D), so that a
    low-rank R (r x D) appends as extra rows.
    """

    gate: torch.Tensor
    gate_bias: torch.Tensor | None
    up: torch.Tensor
    up_bias: torch.Tensor | None
    down_rows: torch.Tensor


class Method:
    """A compressed MLP: what to keep is decided once per sample, from the prompt."""

    name = "base"
    per_sample_weights = False  # True: gather() builds each sample's own smaller matrices
    reads_down_rows = False  # True: a sparse kernel reads rows of W2^T (kept contiguous)
    quantizer: dict | None = None  # a quantizing method's settings (adapters record them)
    reselects = False  # True: scores(hidden, valid) and select_top(scores) (GRIFFIN's rho)

    def __init__(self, density: float) -> None:
        self.density = density

    def select(
        self, act_gate: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor | None:
        """Per-sample state from prompt positions where `valid` (B, S) is True."""
        raise NotImplementedError

    def streams(self, dtype: torch.dtype) -> bool:
        """Whether select() can be taken over a prompt seen in chunks (accumulate, then
        finish), with the very result it gives on the whole prompt at once."""
        return False

    def accumulate(self, stream, act_gate: torch.Tensor, hidden: torch.Tensor,
                   valid: torch.Tensor):
        """Fold one chunk of the prompt into `stream` (None before the first chunk)."""
        raise NotImplementedError(f"{self.name} cannot take a prompt in chunks")

    def finish(self, stream) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scores, selection) from a whole prompt's stream; scores only if reselects."""
        raise NotImplementedError(f"{self.name} cannot take a prompt in chunks")

    def keep_mask(self, state: torch.Tensor | None, act_gate: torch.Tensor) -> torch.Tensor | None:
        """Reference form: a 0/1 mask broadcastable to act_gate (None keeps everything)."""
        raise NotImplementedError

    def gather(self, mlp: nn.Module, state: torch.Tensor | None, extra: int = 0,
               reuse: FastWeights | None = None) -> FastWeights:
        """The (possibly smaller) weights the fast decode path reads. Per-sample weights
        (per_sample_weights) leave `extra` rows at the end of up and down for the block's L
        and R, and may be written into `reuse`, the previous prompt's, when shapes fit."""
        return FastWeights(
            gate=mlp.gate_proj.weight,
            gate_bias=mlp.gate_proj.bias,
            up=mlp.up_proj.weight,
            up_bias=mlp.up_proj.bias,
            down_rows=mlp.down_proj.weight.t(),
        )

    def replacement(self, mlp: nn.Module):
        """A method that decodes with its own copy of the MLP (4-bit weights) returns that
        copy here, built once per attach: a callable x -> FFhat(x). Others return None."""
        return None

    def gate_threshold(self, state: torch.Tensor | None) -> torch.Tensor | None:
        """Per-sample |gate| threshold applied in the fast path (CATS), else None."""
        return None
