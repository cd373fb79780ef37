"""CATS' real sparse decode on GPUs (Triton): read only the rows whose gate survives.

One decode token per sample: CATS keeps the gate entries with |act(x Wg)| > tau (tau per
sample). Two kernels:
- `_up_kernel`: for each block of rows j, the dot products W1[j] . x for the kept rows only
  (the loads of the other rows are masked off, so their bytes are never read), times the
  gate; rows past D_FF (the low-rank L^T appended by Caprese) are always kept, gate 1;
- `_down_kernel`: for each block of output columns and each chunk of ROWS_PER_PROGRAM rows,
  the sum over the chunk's kept rows of hidden[j] * W2^T[j], again with the other rows'
  loads masked off; torch adds the chunks' partial sums. One program per block of columns
  alone would be D / BLOCK_D programs (40 for a 14B model), too few to keep a GPU's
  memory busy: each would stream all D_FF rows on its own.
Rows are read in blocks of at least 128 elements, so a skipped row skips whole memory
transactions. Triton comes with CUDA builds of PyTorch; the tests run these kernels on the
CPU through Triton's interpreter (TRITON_INTERPRET=1).

The launch is a torch operator (torch.ops.caprese_triton.cats_decode), so a compiled decode
step holds it as one opaque node: the cudagraphs backend cannot take dynamo's own wrapping
of a raw Triton launch (torch 2.11 fails on its dict-valued output), and a CUDA graph
replays the operator's two launches like any other kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _up_kernel(x_ptr, act_ptr, tau_ptr, up_ptr, hidden_ptr, rows, d_ff, dim,
               BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    sample = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    in_rows = j < rows
    act = tl.load(act_ptr + sample * d_ff + j, mask=j < d_ff, other=1.0).to(tl.float32)
    tau = tl.load(tau_ptr + sample).to(tl.float32)
    keep = in_rows & ((tl.abs(act) > tau) | (j >= d_ff))
    acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + sample * dim + d, mask=d < dim, other=0.0).to(tl.float32)
        w = tl.load(up_ptr + j[:, None] * dim + d[None, :],
                    mask=keep[:, None] & (d[None, :] < dim), other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    gate = tl.where(j < d_ff, act, 1.0)
    tl.store(hidden_ptr + sample * rows + j, tl.where(keep, acc * gate, 0.0), mask=in_rows)


@triton.jit
def _down_kernel(hidden_ptr, down_ptr, partial_ptr, batch, rows, dim,
                 BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    sample, chunk = tl.program_id(0), tl.program_id(2)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_J):
        j = chunk * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_J)
        h = tl.load(hidden_ptr + sample * rows + j, mask=j < rows, other=0.0)
        keep = h != 0.0
        w = tl.load(down_ptr + j[:, None] * dim + d[None, :],
                    mask=keep[:, None] & (d[None, :] < dim), other=0.0).to(tl.float32)
        acc += tl.sum(h[:, None] * w, axis=0)
    tl.store(partial_ptr + (chunk * batch + sample) * dim + d, acc, mask=d < dim)


def cats_decode(x: torch.Tensor, act_gate: torch.Tensor, tau: torch.Tensor,
                up_rows: torch.Tensor, down_rows: torch.Tensor,
                block_j: int = 32, block_d: int = 128, rows_per_program: int = 512
                ) -> torch.Tensor:
    """One token per sample through a CATS MLP (+ the low-rank rows past D_FF).

    x (B, 1, D); act_gate (B, 1, D_FF), the gate activations; tau (B,); up_rows and
    down_rows (D_FF + r, D), contiguous. Returns (B, 1, D) in x's dtype.
    """
    batch, dim = x.shape[0], x.shape[-1]
    if not (up_rows.is_contiguous() and down_rows.is_contiguous()
            and up_rows.shape == down_rows.shape and up_rows.shape[1] == dim):
        raise ValueError("up_rows and down_rows must be contiguous (D_FF + r, D) matrices")
    if rows_per_program % block_j:
        raise ValueError(f"rows_per_program ({rows_per_program}) must be a multiple of "
                         f"block_j ({block_j}): each program reads whole blocks of rows")
    x = x.reshape(batch, dim).contiguous()
    act = act_gate.reshape(batch, act_gate.shape[-1]).contiguous()
    tau = tau.reshape(batch).float().contiguous()
    out = _cats_decode_op(x, act, tau, up_rows, down_rows, block_j, block_d, rows_per_program)
    return out.reshape(batch, 1, dim)


@torch.library.custom_op("caprese_triton::cats_decode", mutates_args=())
def _cats_decode_op(x: torch.Tensor, act: torch.Tensor, tau: torch.Tensor,
                    up_rows: torch.Tensor, down_rows: torch.Tensor, block_j: int,
                    block_d: int, rows_per_program: int) -> torch.Tensor:
    """x (B, D), act (B, D_FF), tau (B,) float32, all contiguous: (B, D) in x's dtype."""
    (batch, dim), (rows, d_ff) = x.shape, (up_rows.shape[0], act.shape[-1])
    hidden = torch.empty(batch, rows, device=x.device, dtype=torch.float32)
    _up_kernel[(batch, triton.cdiv(rows, block_j))](
        x, act, tau, up_rows, hidden, rows, d_ff, dim, BLOCK_J=block_j, BLOCK_D=block_d)
    chunks = triton.cdiv(rows, rows_per_program)
    partial = torch.empty(chunks, batch, dim, device=x.device, dtype=torch.float32)
    _down_kernel[(batch, triton.cdiv(dim, block_d), chunks)](
        hidden, down_rows, partial, batch, rows, dim, BLOCK_J=block_j, BLOCK_D=block_d,
        ROWS_PER_PROGRAM=rows_per_program)
    return partial.sum(0).to(x.dtype)


@_cats_decode_op.register_fake
def _(x, act, tau, up_rows, down_rows, block_j, block_d, rows_per_program):
    return x.new_empty(x.shape)
