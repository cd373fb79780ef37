"""The dense MLP as a method: nothing is dropped (for tests and the low-rank path alone)."""

from __future__ import annotations

import torch

from caprese.methods.base import Method


class Dense(Method):
    name = "none"

    def select(self, act_gate, hidden, valid) -> None:
        return None

    def streams(self, dtype: torch.dtype) -> bool:
        return True  # nothing is selected

    def accumulate(self, stream, act_gate, hidden, valid) -> None:
        return None

    def finish(self, stream) -> tuple[None, None]:
        return None, None

    def keep_mask(self, state, act_gate: torch.Tensor) -> None:
        return None
