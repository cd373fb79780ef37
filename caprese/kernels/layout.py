"""Decode layouts that take the place of a weight's storage instead of sitting beside it.

The fused form multiplies u = x [W1 | L] and out = u [W2^T ; R], and CATS' sparse kernel
reads rows of W2^T. Built as new tensors beside the model's W1 and W2, those layouts held a
second copy of both matrices in every layer: Caprese(CATS) needed more memory than the model.
Here the layout is one buffer of n + r rows; the original values move into its first n rows
and the nn.Linear's weight becomes a view of them (transposed for W2), so the model, its
prefill and the fused decode all read the same single copy. The values never change; only
W2's prefill product reads them through a transposed view (equal up to rounding).
"""

from __future__ import annotations

import torch
from torch import nn


def rows_of(linear: nn.Linear, transposed: bool) -> torch.Tensor:
    """The weight as the rows a decode product reads: W (out, in), or W^T (in, out)."""
    return linear.weight.t() if transposed else linear.weight


def lives_in(linear: nn.Linear, buffer: torch.Tensor, transposed: bool) -> bool:
    """Whether the linear's weight is the view `rows_buffer` made of `buffer`'s first rows."""
    rows = rows_of(linear, transposed)
    return (rows.data_ptr() == buffer.data_ptr() and rows.stride() == buffer.stride()
            and rows.shape[1] == buffer.shape[1] and rows.shape[0] <= buffer.shape[0]
            and rows.dtype == buffer.dtype and rows.device == buffer.device)


@torch.no_grad()
def rows_buffer(linear: nn.Linear, extra: int, transposed: bool) -> torch.Tensor:
    """A contiguous (n + extra, d) buffer whose first n rows hold the weight's rows (see
    rows_of); the weight becomes a view of them. The last `extra` rows are left for the
    caller to fill. A weight that already is such rows, with no extra, is returned as is."""
    rows = rows_of(linear, transposed)
    if extra == 0 and rows.is_contiguous():
        return rows
    buffer = rows.new_empty(rows.shape[0] + extra, rows.shape[1])
    buffer[: rows.shape[0]].copy_(rows)
    view = buffer[: rows.shape[0]]
    linear.weight.data = view.t() if transposed else view  # the old storage is freed here
    return buffer


@torch.no_grad()
def restore(linear: nn.Linear) -> None:
    """Give the weight its own contiguous storage again (what detach leaves behind)."""
    weight = linear.weight.data
    owns = weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    if not weight.is_contiguous():
        linear.weight.data = weight.contiguous()
    elif not owns:
        linear.weight.data = weight.clone()
