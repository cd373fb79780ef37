"""CPU kernels for CATS' real sparse decode: read only the rows whose gate survives.

For one token, CATS keeps about `density` of the D_FF gate entries. The dense masked form
still reads all of W1 and W2; these two kernels read only the kept rows of W1 (up) and of
W2^T (down), so the bytes read per token really drop:

    gather_matvec(rows, idx, x)[j]  = rows[idx[j]] . x            (up, one dot per kept row)
    gather_combine(rows, idx, w)    = sum_j w[j] * rows[idx[j]]     (down, a weighted row sum)

PyTorch has no fused gather + matrix-vector product (index_select copies the rows first,
which costs more than it saves), so they are compiled once with torch's C++ extension
loader and cached. Set CAPRESE_NO_KERNELS=1 to skip them; callers then fall back to the
masked dense form, which computes the same values.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

static inline float to_float(float v) { return v; }
static inline float to_float(at::BFloat16 v) {
  uint32_t bits = uint32_t(reinterpret_cast<const uint16_t&>(v)) << 16;
  float out; std::memcpy(&out, &bits, 4); return out;
}

template <typename T>
static void matvec(const T* rows, int64_t dim, const int64_t* idx, int64_t count,
                   const float* x, float* out) {
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* row = rows + idx[j] * dim;
      float acc = 0.f;
      #pragma omp simd reduction(+:acc)
      for (int64_t d = 0; d < dim; ++d) acc += to_float(row[d]) * x[d];
      out[j] = acc;
    }
  });
}

template <typename T>
static void combine(const T* rows, int64_t dim, const int64_t* idx, int64_t count,
                    const float* w, float* out) {
  at::parallel_for(0, dim, 256, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) out[d] = 0.f;
    for (int64_t j = 0; j < count; ++j) {
      const T* row = rows + idx[j] * dim;
      const float weight = w[j];
      #pragma omp simd
      for (int64_t d = begin; d < end; ++d) out[d] += weight * to_float(row[d]);
    }
  });
}

static void check(const torch::Tensor& rows, const torch::Tensor& idx, const torch::Tensor& v) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous() && rows.device().is_cpu(),
              "rows must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16,
              "rows must be float32 or bfloat16");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous(), "idx must be int64");
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous(), "vector must be float32");
}

torch::Tensor gather_matvec(torch::Tensor rows, torch::Tensor idx, torch::Tensor x) {
  check(rows, idx, x);
  TORCH_CHECK(x.numel() == rows.size(1), "x must have one entry per column");
  auto out = torch::empty({idx.numel()}, x.options());
  if (rows.scalar_type() == at::kFloat)
    matvec(rows.data_ptr<float>(), rows.size(1), idx.data_ptr<int64_t>(), idx.numel(),
           x.data_ptr<float>(), out.data_ptr<float>());
  else
    matvec(rows.data_ptr<at::BFloat16>(), rows.size(1), idx.data_ptr<int64_t>(), idx.numel(),
           x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

torch::Tensor gather_combine(torch::Tensor rows, torch::Tensor idx, torch::Tensor w) {
  check(rows, idx, w);
  TORCH_CHECK(w.numel() == idx.numel(), "one weight per index");
  auto out = torch::empty({rows.size(1)}, w.options());
  if (rows.scalar_type() == at::kFloat)
    combine(rows.data_ptr<float>(), rows.size(1), idx.data_ptr<int64_t>(), idx.numel(),
            w.data_ptr<float>(), out.data_ptr<float>());
  else
    combine(rows.data_ptr<at::BFloat16>(), rows.size(1), idx.data_ptr<int64_t>(), idx.numel(),
            w.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_matvec", &gather_matvec);
  m.def("gather_combine", &gather_combine);
}
"""

_lock = threading.Lock()
_module = None
_failed = False


def kernels():
    """The compiled module, or None (disabled, or no compiler on this machine)."""
    global _module, _failed
    if os.environ.get("CAPRESE_NO_KERNELS") == "1" or _failed:
        return None
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load_inline

                log.info("building caprese's CPU sparse kernels (once; cached afterwards)")
                _module = load_inline(
                    name="caprese_sparse_cpu_v1", cpp_sources=_SOURCE, functions=None,
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
            except Exception as error:  # no compiler, no headers: the dense form still works
                log.warning("CATS sparse kernels unavailable (%s); using the masked dense "
                            "form", error)
                _failed = True
    return _module


def sparse_decode(x: torch.Tensor, act_gate: torch.Tensor, tau: torch.Tensor,
                  up_rows: torch.Tensor, down_rows: torch.Tensor) -> torch.Tensor | None:
    """One token through a CATS MLP (+ fused low-rank rows past D_FF), or None if unavailable.

    up_rows (D_FF + r, D) and down_rows (D_FF + r, D) are contiguous; rows past D_FF are the
    low-rank path (L^T and R), always kept, multiplied by 1 instead of the gate.
    """
    module = kernels()
    if module is None:
        return None
    flat = act_gate.reshape(-1)
    kept = (flat.abs() > tau).nonzero().reshape(-1)
    gate = flat.float()[kept]
    d_ff, rows = flat.numel(), up_rows.shape[0]
    if rows > d_ff:
        kept = torch.cat([kept, torch.arange(d_ff, rows, device=kept.device)])
    hidden = module.gather_matvec(up_rows, kept, x.reshape(-1).float())
    hidden[: gate.numel()] *= gate
    out = module.gather_combine(down_rows, kept, hidden)
    return out.to(x.dtype).reshape(x.shape)
