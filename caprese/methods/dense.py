"""The dense MLP as a method: nothing is dropped (for tests and the low-rank path alone)."""

from __future__ import annotations

import torch

from caprese.methods.base import Method


class Dense(Method):
    name = "none"

    def select(self, act_gate, hidden, valid) -> None:
        return None

    def keep_mask(self, state, act_gate: torch.Tensor) -> None:
        return None
