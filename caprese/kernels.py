"""CPU decode kernels: a dense matrix-vector product and CATS' real sparse MLP.

Decoding one token multiplies every weight matrix by one vector, so its speed is the speed
of reading the weights. Two kernels, compiled once per kind of CPU with torch's C++
extension loader (AVX-512, else AVX2 + FMA, else plain loops) and cached; set
CAPRESE_NO_KERNELS=1 to skip them (callers fall back to PyTorch, which computes the same
values up to rounding). Without SIMD code CATS' kernel read 4.6x slower than PyTorch on an
AVX2 CPU, which turned CATS' 21% fewer bytes into a 26% slower token (docs/BENCHMARKS.md):

- `linear`: y = x W^T for a few rows of x, four weight rows at a time so the memory system
  streams several rows at once. On the development CPU PyTorch's bf16 product reaches about
  18 GB/s on a model's worth of distinct matrices and this one about 21 GB/s; a bf16 decode
  step of the 1.5B model is 9% faster with it (docs/BENCHMARKS.md). fp32 products stay with
  PyTorch, which is faster there. `rows_product`: y = x M for M stored as rows (the transposed down
  projection with R appended), threads splitting the rows.
- CATS: for one token CATS keeps about `density` of the D_FF gate entries; `cats_decode`
  reads only the kept rows of W1 (up) and of W2^T (down), so the bytes read really drop.
  PyTorch has no fused gather + matrix-vector product (index_select copies the rows first,
  which costs more than it saves).

`use_decode_kernels(model)` routes every single-token linear of a model through them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
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
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

static inline float to_float(float v) { return v; }
static inline float to_float(at::BFloat16 v) {
  uint32_t bits = uint32_t(reinterpret_cast<const uint16_t&>(v)) << 16;
  float out; std::memcpy(&out, &bits, 4); return out;
}
// One SIMD vector of floats: 16 lanes with AVX-512, 8 with AVX2 + FMA (bf16 widens to
// float by a 16-bit shift), none otherwise (the scalar loops below do all the work).
#if defined(__AVX512F__)
#define CAPRESE_SIMD 16
typedef __m512 vec;
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vload(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vset(float v) { return _mm512_set1_ps(v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define CAPRESE_SIMD 8
typedef __m256 vec;
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vload(const at::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vset(float v) { return _mm256_set1_ps(v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline float vsum(vec v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)));
}
#endif

template <typename T>
static void axpy(float w, const T* row, float* out, int64_t begin, int64_t end) {
  int64_t d = begin;
#if defined(CAPRESE_SIMD)
  const vec wv = vset(w);
  for (; d + CAPRESE_SIMD <= end; d += CAPRESE_SIMD)
    vstore(out + d, vfma(wv, vload(row + d), vload(out + d)));
#endif
  for (; d < end; ++d) out[d] += w * to_float(row[d]);
}

// out (rows, O) = x (rows, I) W^T, W (O, I) row-major; four weight rows per pass share the
// loads of x, up to four rows of x per pass share the loads of W.
// index (optional): output o reads weight row index[o] (CATS' kept rows).
template <typename T>
static void linear_block(const T* w, const float* x, int64_t rows, int64_t in, int64_t o0,
                         int64_t out_features, float* out, const int64_t* index = nullptr) {
  const int64_t nr = std::min<int64_t>(4, out_features - o0);
  const T* row[4];
  for (int r = 0; r < nr; ++r) row[r] = w + (index ? index[o0 + r] : o0 + r) * in;
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const int64_t mb = std::min<int64_t>(4, rows - m0);
    float sums[4][4] = {};
    int64_t d = 0;
#if defined(CAPRESE_SIMD)
    vec acc[4][4];
    for (int r = 0; r < 4; ++r) for (int m = 0; m < 4; ++m) acc[r][m] = vzero();
    for (; d + CAPRESE_SIMD <= in; d += CAPRESE_SIMD) {
      vec xv[4];
      for (int m = 0; m < mb; ++m) xv[m] = vload(x + (m0 + m) * in + d);
      for (int r = 0; r < nr; ++r) {
        const vec wv = vload(row[r] + d);
        for (int m = 0; m < mb; ++m) acc[r][m] = vfma(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < nr; ++r)
      for (int m = 0; m < mb; ++m) sums[r][m] = vsum(acc[r][m]);
#endif
    for (int r = 0; r < nr; ++r)
      for (int m = 0; m < mb; ++m) {
        float s = sums[r][m];
        for (int64_t t = d; t < in; ++t) s += to_float(row[r][t]) * x[(m0 + m) * in + t];
        out[(m0 + m) * out_features + o0 + r] = s;
      }
  }
}

torch::Tensor linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous (out, in) matrix");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "weights must be float32 or bfloat16");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
              x.size(1) == w.size(1), "x must be a contiguous float32 (rows, in) matrix");
  const int64_t rows = x.size(0), in = w.size(1), out_features = w.size(0);
  auto out = torch::empty({rows, out_features}, x.options());
  at::parallel_for(0, (out_features + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      if (w.scalar_type() == at::kFloat)
        linear_block(w.data_ptr<float>(), x.data_ptr<float>(), rows, in, block * 4,
                     out_features, out.data_ptr<float>());
      else
        linear_block(w.data_ptr<at::BFloat16>(), x.data_ptr<float>(), rows, in, block * 4,
                     out_features, out.data_ptr<float>());
    }
  });
  return out;
}

// Threads split the rows, each reads its rows whole (front to back) into a private
// accumulator; the accumulators are added up at the end.
template <typename T>
static void weighted_rows(const float* weight, const T* rows, int64_t count, int64_t dim,
                          const int64_t* index, float* out) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                   count / 256 + 1));
  std::vector<float> partial(threads * dim, 0.f);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      float* acc = partial.data() + t * dim;
      for (int64_t j = t * count / threads; j < (t + 1) * count / threads; ++j)
        axpy(weight[j], rows + (index ? index[j] : j) * dim, acc, 0, dim);
    }
  });
  for (int64_t d = 0; d < dim; ++d) {
    float total = 0.f;
    for (int64_t t = 0; t < threads; ++t) total += partial[t * dim + d];
    out[d] = total;
  }
}

torch::Tensor rows_product(torch::Tensor x, torch::Tensor rows) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous(), "rows must be a contiguous matrix");
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16,
              "rows must be float32 or bfloat16");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == rows.size(0),
              "x must be a contiguous float32 vector with one entry per row");
  auto out = torch::empty({rows.size(1)}, x.options());
  if (rows.scalar_type() == at::kFloat)
    weighted_rows(x.data_ptr<float>(), rows.data_ptr<float>(), rows.size(0), rows.size(1),
                  nullptr, out.data_ptr<float>());
  else
    weighted_rows(x.data_ptr<float>(), rows.data_ptr<at::BFloat16>(), rows.size(0),
                  rows.size(1), nullptr, out.data_ptr<float>());
  return out;
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
  at::parallel_for(0, (count + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      linear_block(up, x, 1, dim, block * 4, count, hidden.data(), kept.data());
  });
  for (int64_t j = 0; j < count; ++j) hidden[j] *= gate[j];
  weighted_rows(hidden.data(), down, count, dim, kept.data(), out);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cats_decode", &cats_decode);
  m.def("linear", &linear);
  m.def("rows_product", &rows_product);
}
"""

_lock = threading.Lock()
_module = None
_failed = False


def cpu_tag(cpuinfo: str = "/proc/cpuinfo") -> str:
    """A short hash of this CPU's instruction-set flags.

    The module is compiled with -march=native, and torch caches it by name alone: a home
    directory shared by an AVX-512 and an AVX2 machine would hand the second one code it
    cannot run (SIGILL). The name carries this tag, so each kind of CPU builds its own."""
    try:
        with open(cpuinfo) as lines:
            flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def kernels():
    """The compiled module, or None (disabled, or no compiler on this machine)."""
    global _module, _failed
    if os.environ.get("CAPRESE_NO_KERNELS") == "1" or _failed:
        return None
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load_inline

                log.info("building caprese's CPU decode kernels (once; cached afterwards)")
                _module = load_inline(
                    name=f"caprese_cpu_kernels_v7_{cpu_tag()}", cpp_sources=_SOURCE, functions=None,
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as error:  # no compiler, no headers: the dense form still works
                log.warning("CPU decode kernels unavailable (%s); using PyTorch", error)
                _failed = True
    return _module


def gpu_cats_decode():
    """Triton's CATS decode (caprese.kernels_triton), or None: disabled, or no Triton."""
    if os.environ.get("CAPRESE_NO_KERNELS") == "1":
        return None
    try:
        from caprese.kernels_triton import cats_decode
    except ImportError:
        return None
    return cats_decode


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


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One token, bf16 weights, on the CPU, no autograd (the kernels compute values, not
    gradients). fp32 stays with PyTorch: its fp32 product already runs at 83% of the
    bandwidth floor here and the kernel measured slower (docs/BENCHMARKS.md)."""
    return (x.device.type == "cpu" and x.numel() == x.shape[-1]
            and weight.dtype == torch.bfloat16
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _module_for(x: torch.Tensor, weight: torch.Tensor):
    """The compiled module when a one-token product with this contiguous weight applies."""
    if not _applies(x, weight) or not weight.is_contiguous():
        return None
    return kernels()


def _finish(out: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add the bias in fp32, round once to x's dtype, restore x's leading shape."""
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor | None:
    """x W^T + b for one token (weight (out, in), contiguous), or None where it does not apply."""
    module = _module_for(x, weight)
    if module is None:
        return None
    return _finish(module.linear(x.reshape(1, -1).float(), weight), bias, x)


def decode_rows_product(x: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None
                        ) -> torch.Tensor | None:
    """x @ rows + b for one token (rows (K, D), contiguous), or None where it does not apply."""
    module = _module_for(x, rows)
    if module is None:
        return None
    return _finish(module.rows_product(x.reshape(-1).float().contiguous(), rows), bias, x)


def _kernel_forward(linear: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = decode_linear(x, linear.weight, linear.bias)
        return torch.nn.functional.linear(x, linear.weight, linear.bias) if out is None else out
    return forward


def use_decode_kernels(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Route every single-token linear of `model` (and Caprese's fused decode) through the
    kernels; other inputs keep PyTorch's path. enabled=False restores PyTorch everywhere."""
    from caprese.block import CapreseBlock

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if enabled:
                module.forward = _kernel_forward(module)
            elif "forward" in module.__dict__:
                del module.forward
        elif isinstance(module, CapreseBlock):
            module.dense_kernels = enabled
    return model
