"""The one place that picks how a block's decode products run: PyTorch, CPU kernels, Triton.

A backend multiplies decode tokens by (possibly per-sample) weights and may run CATS' sparse
MLP; each of its methods computes the same values as PyTorch's products up to rounding, and
`cats_mlp` returns None where it does not apply (the block then takes the masked dense form).

    KERNELS   "auto"   the fastest applicable: CPU -> sparse CATS by the CPU kernel; CUDA ->
                       sparse CATS by Triton (when installed); dense products by PyTorch
              "torch"  PyTorch only (no sparse CATS)
              "cpu"    CPU kernels for sparse CATS and for every single-token product
              "triton" Triton's sparse CATS on any device (the CPU through its interpreter)
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from caprese.kernels import cpu

KERNELS = ("auto", "torch", "cpu", "triton")


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias for shared (2-D) or per-sample (3-D) weights."""
    if weight.dim() == 2:
        return nn.functional.linear(x, weight, bias)
    y = torch.bmm(x, weight.transpose(1, 2))
    if bias is None:
        return y
    return y + (bias if bias.dim() == 1 else bias[:, None, :])


class TorchBackend:
    """PyTorch's products; no sparse CATS."""

    name = "torch"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
        return linear_rows(x, weight, bias)

    def rows_product(self, hidden: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None
                     ) -> torch.Tensor:
        """hidden @ rows + bias, rows (K, D) or per sample (B, K, D)."""
        return linear_rows(hidden, rows.transpose(-2, -1), bias)

    def cats_mlp(self, x, act_gate, tau, up_rows, down_rows) -> torch.Tensor | None:
        return None


class CpuBackend(TorchBackend):
    """Sparse CATS by the CPU kernel for one token of one sample; with dense=True also every
    single-token product (bf16), which PyTorch computes slowly on CPUs for these shapes."""

    name = "cpu"

    def __init__(self, dense: bool) -> None:
        self.dense = dense

    def linear(self, x, weight, bias):
        if self.dense and x.shape[0] == 1:
            if bias is not None and bias.dim() == 2:
                bias = bias[0]
            out = cpu.linear(x, weight.reshape(weight.shape[-2:]), bias)
            if out is not None:
                return out
        return linear_rows(x, weight, bias)

    def rows_product(self, hidden, rows, bias):
        if self.dense and hidden.shape[0] == 1:
            out = cpu.rows_product(hidden, rows.reshape(rows.shape[-2:]), bias)
            if out is not None:
                return out
        return super().rows_product(hidden, rows, bias)

    def cats_mlp(self, x, act_gate, tau, up_rows, down_rows):
        if x.shape[:2] != (1, 1) or x.device.type != "cpu":
            return None
        return cpu.cats_decode(x, act_gate, tau[0], up_rows, down_rows)


class TritonBackend(TorchBackend):
    """Sparse CATS by Triton for one token per sample (each sample its own threshold)."""

    name = "triton"

    def cats_mlp(self, x, act_gate, tau, up_rows, down_rows):
        if x.shape[1] != 1:
            return None
        from caprese.kernels.triton import cats_decode

        return cats_decode(x, act_gate, tau, up_rows, down_rows)


@functools.cache
def _triton_installed() -> bool:
    try:
        import caprese.kernels.triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device, kernels: str = "auto") -> TorchBackend:
    """The backend for a block on `device` (see KERNELS); CAPRESE_NO_KERNELS=1 turns "auto"
    into "torch". A compiled step keeps the CPU kernels: they are torch operators, nodes of
    its graph."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "auto":
        if cpu.disabled():
            kernels = "torch"
        elif device.type == "cpu":
            kernels = "cpu-sparse"
        elif device.type == "cuda" and _triton_installed():
            kernels = "triton"
        else:
            kernels = "torch"
    return _BACKENDS[kernels]


_BACKENDS = {"torch": TorchBackend(), "cpu-sparse": CpuBackend(dense=False),
             "cpu": CpuBackend(dense=True), "triton": TritonBackend()}
