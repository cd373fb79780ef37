"""CPU kernels for CATS' real sparse decode: read only the rows whose gate survives.

For one token, CATS keeps about `density` of the D_FF gate entries. The dense masked form
still reads all of W1 and W2; this kernel reads only the kept rows of W1 (up) and of W2^T
(down), so the bytes read per token really drop. In one call it lists the kept entries,
takes one dot product per kept row of W1 (times its gate), and sums the kept rows of W2^T
weighted by those values (threads split the output columns).

PyTorch has no fused gather + matrix-vector product (index_select copies the rows first,
which costs more than it saves), so the kernel is compiled once with torch's C++ extension
loader (AVX-512 where the CPU has it) and cached. Set CAPRESE_NO_KERNELS=1 to skip it;
callers then fall back to the masked dense form, which computes the same values.
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
#include <vector>
#include <algorithm>
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float to_float(float v) { return v; }
static inline float to_float(at::BFloat16 v) {
  uint32_t bits = uint32_t(reinterpret_cast<const uint16_t&>(v)) << 16;
  float out; std::memcpy(&out, &bits, 4); return out;
}
#if defined(__AVX512F__)
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

template <typename T>
static float dot(const T* row, const float* x, int64_t dim) {
  int64_t d = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; d + 32 <= dim; d += 32) {
    a0 = _mm512_fmadd_ps(load16(row + d), _mm512_loadu_ps(x + d), a0);
    a1 = _mm512_fmadd_ps(load16(row + d + 16), _mm512_loadu_ps(x + d + 16), a1);
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; d < dim; ++d) acc += to_float(row[d]) * x[d];
  return acc;
}

template <typename T>
static void axpy(float w, const T* row, float* out, int64_t begin, int64_t end) {
  int64_t d = begin;
#if defined(__AVX512F__)
  const __m512 wv = _mm512_set1_ps(w);
  for (; d + 16 <= end; d += 16)
    _mm512_storeu_ps(out + d, _mm512_fmadd_ps(wv, load16(row + d), _mm512_loadu_ps(out + d)));
#endif
  for (; d < end; ++d) out[d] += w * to_float(row[d]);
}

// One token through a CATS MLP: act (d_ff gate activations, float), rows of up / down
// (n_rows x dim, n_rows >= d_ff; rows past d_ff are always kept with weight 1).
template <typename T>
static void cats_mlp(const float* act, float tau, const T* up, const T* down, int64_t n_rows,
                     int64_t d_ff, const float* x, int64_t dim, float* out) {
  std::vector<int64_t> kept;
  std::vector<float> gate;
  kept.reserve(n_rows);
  gate.reserve(n_rows);
  for (int64_t j = 0; j < d_ff; ++j)
    if (std::abs(act[j]) > tau) { kept.push_back(j); gate.push_back(act[j]); }
  for (int64_t j = d_ff; j < n_rows; ++j) { kept.push_back(j); gate.push_back(1.f); }
  const int64_t count = kept.size();
  std::vector<float> hidden(count);
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) hidden[j] = gate[j] * dot(up + kept[j] * dim, x, dim);
  });
  // Down: threads split the kept rows (each row read whole, front to back) and sum into
  // private accumulators, added up at the end.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                   count / 256 + 1));
  std::vector<float> partial(threads * dim, 0.f);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      float* acc = partial.data() + t * dim;
      for (int64_t j = t * count / threads; j < (t + 1) * count / threads; ++j)
        axpy(hidden[j], down + kept[j] * dim, acc, 0, dim);
    }
  });
  for (int64_t d = 0; d < dim; ++d) {
    float total = 0.f;
    for (int64_t t = 0; t < threads; ++t) total += partial[t * dim + d];
    out[d] = total;
  }
}

torch::Tensor cats_decode(torch::Tensor act, double tau, torch::Tensor up, torch::Tensor down,
                          torch::Tensor x) {
  TORCH_CHECK(up.dim() == 2 && up.is_contiguous() && down.is_contiguous() &&
              up.sizes() == down.sizes() && up.scalar_type() == down.scalar_type(),
              "up and down rows must be contiguous (rows x dim) tensors of one shape");
  TORCH_CHECK(up.scalar_type() == at::kFloat || up.scalar_type() == at::kBFloat16,
              "weights must be float32 or bfloat16");
  TORCH_CHECK(act.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
              act.is_contiguous() && x.is_contiguous(), "act and x must be contiguous float32");
  TORCH_CHECK(x.numel() == up.size(1) && act.numel() <= up.size(0), "shape mismatch");
  auto out = torch::empty({up.size(1)}, x.options());
  if (up.scalar_type() == at::kFloat)
    cats_mlp(act.data_ptr<float>(), float(tau), up.data_ptr<float>(), down.data_ptr<float>(),
             up.size(0), act.numel(), x.data_ptr<float>(), up.size(1), out.data_ptr<float>());
  else
    cats_mlp(act.data_ptr<float>(), float(tau), up.data_ptr<at::BFloat16>(),
             down.data_ptr<at::BFloat16>(), up.size(0), act.numel(), x.data_ptr<float>(),
             up.size(1), out.data_ptr<float>());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("cats_decode", &cats_decode); }
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
                    name="caprese_sparse_cpu_v4", cpp_sources=_SOURCE, functions=None,
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
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
    act = act_gate.reshape(-1).float().contiguous()
    out = module.cats_decode(act, float(tau), up_rows, down_rows, x.reshape(-1).float())
    return out.to(x.dtype).reshape(x.shape)
