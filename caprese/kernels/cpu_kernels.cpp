// caprese's CPU decode kernels (built by caprese/kernels/cpu.py with torch's C++ extension
// loader, -march=native, once per kind of CPU). Tensors in, tensors out:
//   linear(x, W)              x (rows, in) float32 or bf16 times W^T, W (out, in) float32 or
//                             bf16; the result in float32
//   rows_product(x, rows)     x (K,) float32 times rows (K, D): the down projection stored as rows
//   cats_decode(act, tau, up, down, x)
//                             one token through a CATS MLP reading only the kept rows (x float32
//                             or bf16, the result in float32)
//   decode_attention(query, key, value, mask, scale)
//                             one decode token's grouped-query attention over a KV cache
//   abs_order_statistic(values, valid, rank)
//                             CATS' threshold: the rank-th smallest |value| of valid rows
//   abs_histogram(values, valid) the same from a prompt's pieces: counts of 16-bit |value|s
// The four decode kernels are registered as the operators torch.ops.caprese.*: a decode step
// compiled by torch.compile calls them as nodes of its graph instead of breaking it there
// (their output shapes for tracing are registered in cpu.py). One translation unit: the
// headers beside this file hold the vector helpers (simd.h), the decode attention and CATS'
// threshold selection.
#include "simd.h"
#include "decode_attention.h"
#include "threshold.h"

// CATS' kept rows lie scattered, so the hardware prefetcher, which follows addresses in
// order, cannot fetch them ahead. Its passes read the kept rows one at a time, front to back,
// and while reading a row they ask for the row about kKeptAhead bytes later, one cache line
// per line read. Spread that way, the requests keep the memory system busy without bursts of
// eight whole rows asked for at once, which measured slower (1.14x on a Zen 4 against
// them, side by side: docs/BENCHMARKS.md,
// benchmarks/results/gemv_kernels_epyc_zen4_bf16_kept_spread.json), into the L2 cache
// (prefetch_line).
constexpr int64_t kKeptAhead = 6144;  // bytes
// How many rows ahead to ask for: about kKeptAhead bytes' worth, at least the next row.
static inline int64_t rows_ahead(int64_t row_bytes) {
  return std::max<int64_t>(1, (kKeptAhead + row_bytes - 1) / row_bytes);
}

// 2 x CAPRESE_SIMD bf16 values as two vectors of floats, widened within each 128-bit lane by
// one unpack each (lo: values 0-3 of every eight, hi: values 4-7) instead of in order, which
// takes a lane-crossing widen and a shift per vector. Sums kept in that order are read back
// through unpacked_at. On a Zen 4, GRIFFIN's gathered down rows (rows_product) read 1.21x
// faster so, side by side (benchmarks/results/gemv_kernels_epyc_zen4_bf16_unpacked_rows.json).
template <typename T>
static inline int64_t unpacked_at(int64_t d, int64_t length) {
#if defined(CAPRESE_SIMD)
  constexpr int64_t per_line = kLine / sizeof(T);
  if (std::is_same_v<T, at::BFloat16> && d < length / per_line * per_line) {
    const int64_t i = d % (2 * CAPRESE_SIMD), within = i % 8;
    return d - i + (within < 4 ? 0 : CAPRESE_SIMD) + i / 8 * 4 + within % 4;
  }
#endif
  return d;
}

// out += w row, asking for the line of `ahead` (a row read later) beside each line read;
// bf16 rows land in out in unpacked order (see unpacked_at).
template <typename T>
static void axpy(float w, const T* row, float* out, int64_t length, const T* ahead = nullptr) {
  int64_t d = 0;
#if defined(CAPRESE_SIMD)
  constexpr int64_t per_line = kLine / sizeof(T);
  const vec wv = vset(w);
  for (; d + per_line <= length; d += per_line) {
    if (ahead) prefetch_line(ahead, d);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      for (int64_t v = d; v < d + per_line; v += 2 * CAPRESE_SIMD) {
        vec lo, hi;
        vwiden_unpacked(row + v, lo, hi);
        vstore(out + v, vfma(wv, lo, vload(out + v)));
        vstore(out + v + CAPRESE_SIMD, vfma(wv, hi, vload(out + v + CAPRESE_SIMD)));
      }
    } else {
#pragma GCC unroll 4
      for (int64_t v = d; v < d + per_line; v += CAPRESE_SIMD)
        vstore(out + v, vfma(wv, vload(row + v), vload(out + v)));
    }
  }
#endif
  for (; d < length; ++d) out[d] += w * to_float(row[d]);
}

#if CAPRESE_SIMD == 8
// AVX2, fp32: out += w[0] rows[0] + ... + w[3] rows[3] (rows `length` apart), one load and
// store of out per four rows instead of per row. Each sum takes the rows in the same order
// as four axpy calls, so the results are the same to the bit.
static void axpy4(const float* w, const float* rows, float* out, int64_t length) {
  const vec w0 = vset(w[0]), w1 = vset(w[1]), w2 = vset(w[2]), w3 = vset(w[3]);
  const float *r0 = rows, *r1 = rows + length, *r2 = rows + 2 * length, *r3 = rows + 3 * length;
  int64_t d = 0;
  for (; d + CAPRESE_SIMD <= length; d += CAPRESE_SIMD) {
    vec acc = vfma(w0, vload(r0 + d), vload(out + d));
    acc = vfma(w1, vload(r1 + d), acc);
    acc = vfma(w2, vload(r2 + d), acc);
    vstore(out + d, vfma(w3, vload(r3 + d), acc));
  }
  for (; d < length; ++d) {
    float acc = out[d];
    for (int r = 0; r < 4; ++r) acc += w[r] * rows[r * length + d];
    out[d] = acc;
  }
}
#endif

// out (rows, O) = x (rows, I) W^T, W (O, I) row-major; four weight rows per pass share the
// loads of x, up to four rows of x per pass share the loads of W.
template <typename T>
static void linear_block(const T* w, const float* x, int64_t rows, int64_t in, int64_t o0,
                         int64_t out_features, float* out) {
  const int64_t nr = std::min<int64_t>(4, out_features - o0);
  const T* row[4];
  for (int r = 0; r < nr; ++r) row[r] = w + (o0 + r) * in;
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

// One token (x a single row): eight weight rows per pass, each prefetched a little ahead of
// its loads. More streams in flight and the prefetch keep the memory system busy: on a
// 2-core AMD EPYC in bf16 the 1.5B model's 8960 x 1536 products read 22-33 instead of
// 16-19 GB/s (benchmarks/gemv_kernels.py, docs/BENCHMARKS.md). Rows of up to 8 KB go one
// at a time instead where that measured faster: bf16 with AVX512_BF16, fp32 with AVX2.
constexpr int kRowsPerPass = 8;
constexpr int64_t kPrefetchAhead = 1024;  // bytes
constexpr int64_t kShortRowBytes = 8192;
template <typename T>
static void dot_rows(const T* w, const float* x, const at::BFloat16* x_bf16, int64_t in,
                     int64_t o0, int64_t out_features, float* out) {
  const int64_t nr = std::min<int64_t>(kRowsPerPass, out_features - o0);
  const T* row[kRowsPerPass];
  for (int r = 0; r < nr; ++r) row[r] = w + (o0 + r) * in;
  float sums[kRowsPerPass] = {};
  int64_t d = 0;
#if defined(CAPRESE_SIMD)
  constexpr int64_t ahead = kPrefetchAhead / sizeof(T);
  vec acc[kRowsPerPass];
  for (int r = 0; r < kRowsPerPass; ++r) acc[r] = vzero();
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    // Rows of up to 8 KB one at a time, front to back (one sequential stream per thread:
    // 1.24x on gate/up, 1.43x on the LM head on a Zen 4); longer rows (down) eight at a time.
    if (x_bf16 && in * int64_t(sizeof(T)) <= kShortRowBytes) {
      const int64_t whole = in / 64 * 64;
      for (int r = 0; r < nr; ++r) {
        vec even = vzero(), odd = vzero();
        for (int64_t e = 0; e < whole; e += 64) {  // 32 weight-x pairs per instruction
          even = _mm512_dpbf16_ps(even, (__m512bh)_mm512_loadu_si512(row[r] + e),
                                  (__m512bh)_mm512_loadu_si512(x_bf16 + e));
          odd = _mm512_dpbf16_ps(odd, (__m512bh)_mm512_loadu_si512(row[r] + e + 32),
                                 (__m512bh)_mm512_loadu_si512(x_bf16 + e + 32));
        }
        acc[r] = _mm512_add_ps(even, odd);
      }
      d = whole;
    }
    for (; x_bf16 && d + 32 <= in; d += 32) {  // 32 weight-x pairs per instruction
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x_bf16 + d);
      for (int r = 0; r < nr; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(row[r] + d + ahead), _MM_HINT_T0);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(row[r] + d), xv);
      }
    }
  }
#endif
#if CAPRESE_SIMD == 8
  if constexpr (std::is_same_v<T, float>) {
    // AVX2, fp32: rows of up to 8 KB one at a time, front to back, as bf16 rows above.
    if (in * int64_t(sizeof(T)) <= kShortRowBytes) {
      const int64_t whole = in / 32 * 32;
      for (int r = 0; r < nr; ++r) {
        vec part[4] = {vzero(), vzero(), vzero(), vzero()};  // four chains of FMAs in flight
        for (int64_t e = 0; e < whole; e += 32)
          for (int k = 0; k < 4; ++k)
            part[k] = vfma(vload(row[r] + e + 8 * k), vload(x + e + 8 * k), part[k]);
        acc[r] = vadd(vadd(part[0], part[1]), vadd(part[2], part[3]));
      }
      d = whole;
    }
  }
#endif
  for (; d + CAPRESE_SIMD <= in; d += CAPRESE_SIMD) {
    const vec xv = vload(x + d);
    for (int r = 0; r < nr; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(row[r] + d + ahead), _MM_HINT_T0);
      acc[r] = vfma(vload(row[r] + d), xv, acc[r]);
    }
  }
  for (int r = 0; r < nr; ++r) sums[r] = vsum(acc[r]);
#endif
  for (int r = 0; r < nr; ++r) {
    float total = sums[r];
    for (int64_t t = d; t < in; ++t) total += to_float(row[r][t]) * x[t];
    out[o0 + r] = total;
  }
}

// x_bf16: x itself where it came as bf16 (a bf16 model's activations), else null. Then
// AVX512_BF16's dot-product instruction multiplies 32 weight-x pairs at once, a quarter of
// the instructions of widening each weight by a shift (on AMD's Zen 4, whose AVX-512 runs in
// 256-bit halves, the widening loop could not keep up with memory). The products are exact
// either way; only the order of the sums changes. x (float32) may be null where the pairs
// cover every product (rows a multiple of 32 long).
template <typename T>
static void one_token(const T* w, const float* x, const at::BFloat16* x_bf16, int64_t in,
                      int64_t out_features, float* out) {
  at::parallel_for(0, (out_features + kRowsPerPass - 1) / kRowsPerPass, 16,
                   [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      dot_rows(w, x, x_bf16, in, block * kRowsPerPass, out_features, out);
  });
}

// x . row, asking for the line of `ahead` (a row read later) beside each line read.
template <typename T>
static float dot_prefetching(const T* row, const T* ahead, const float* x,
                             const at::BFloat16* x_bf16, int64_t in) {
  float total = 0.f;
  int64_t d = 0;
#if defined(CAPRESE_SIMD)
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (x_bf16) {  // two lines of 32 weight-x pairs per step, one instruction each
      __m512 even = vzero(), odd = vzero();
      for (; d + 64 <= in; d += 64) {
        prefetch_line(ahead, d);
        prefetch_line(ahead, d + 32);
        even = _mm512_dpbf16_ps(even, (__m512bh)_mm512_loadu_si512(row + d),
                                (__m512bh)_mm512_loadu_si512(x_bf16 + d));
        odd = _mm512_dpbf16_ps(odd, (__m512bh)_mm512_loadu_si512(row + d + 32),
                               (__m512bh)_mm512_loadu_si512(x_bf16 + d + 32));
      }
      total = vsum(_mm512_add_ps(even, odd));
    }
  }
#endif
  constexpr int64_t per_line = kLine / sizeof(T);
  if (d + per_line <= in) {  // whole lines left (none after the bf16 pairs of a 3 KB row)
    vec acc = vzero();
    for (; d + per_line <= in; d += per_line) {
      prefetch_line(ahead, d);
      for (int64_t v = d; v < d + per_line; v += CAPRESE_SIMD)
        acc = vfma(vload(row + v), vload(x + v), acc);
    }
    total += vsum(acc);
  }
#endif
  for (; d < in; ++d) total += to_float(row[d]) * x[d];
  return total;
}

// out[j] = x . w[index[j]] for CATS' kept rows: threads split the rows, each reads its share
// one row at a time front to back, asking for the rows ahead as it goes.
template <typename T>
static void kept_dots(const T* w, const float* x, const at::BFloat16* x_bf16, int64_t in,
                      const int64_t* index, int64_t count, float* out) {
  const int64_t ahead = rows_ahead(in * int64_t(sizeof(T)));
  at::parallel_for(0, count, 64, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < std::min(last, first + ahead); ++j)
      prefetch_row(w + index[j] * in, in);
    for (int64_t j = first; j < last; ++j)
      out[j] = dot_prefetching(w + index[j] * in, w + index[std::min(j + ahead, last - 1)] * in,
                               x, x_bf16, in);
  });
}

// x as float32 (a copy only where it came as bf16), and its bf16 values where it came so.
// pairs_only: the products read bf16 pairs only, so a bf16 x needs no float32 copy (an
// undefined tensor instead of a copy per product: 197 per step of the 1.5B model).
static std::pair<torch::Tensor, const at::BFloat16*> float_and_bf16(const torch::Tensor& x,
                                                                    bool pairs_only = false) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  const at::BFloat16* raw = x.scalar_type() == at::kBFloat16 ? x.data_ptr<at::BFloat16>() : nullptr;
  if (raw && pairs_only) return {torch::Tensor(), raw};
  return {x.to(at::kFloat), raw};
}

torch::Tensor linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous (out, in) matrix");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "weights must be float32 or bfloat16");
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.size(1) == w.size(1),
              "x must be a contiguous (rows, in) matrix");
  const int64_t rows = x.size(0), in = w.size(1), out_features = w.size(0);
#if defined(__AVX512BF16__)
  const bool pairs_only = rows == 1 && w.scalar_type() == at::kBFloat16 && in % 32 == 0;
#else
  const bool pairs_only = false;
#endif
  const auto [xf, x_bf16] = float_and_bf16(x, pairs_only);
  auto out = torch::empty({rows, out_features}, x.options().dtype(at::kFloat));
  if (rows == 1) {
    const float* x_float = xf.defined() ? xf.data_ptr<float>() : nullptr;
    if (w.scalar_type() == at::kFloat)
      one_token(w.data_ptr<float>(), x_float, nullptr, in, out_features, out.data_ptr<float>());
    else
      one_token(w.data_ptr<at::BFloat16>(), x_float, x_bf16, in, out_features,
                out.data_ptr<float>());
    return out;
  }
  at::parallel_for(0, (out_features + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      if (w.scalar_type() == at::kFloat)
        linear_block(w.data_ptr<float>(), xf.data_ptr<float>(), rows, in, block * 4,
                     out_features, out.data_ptr<float>());
      else
        linear_block(w.data_ptr<at::BFloat16>(), xf.data_ptr<float>(), rows, in, block * 4,
                     out_features, out.data_ptr<float>());
    }
  });
  return out;
}

// Threads split the rows, each reads its rows whole (front to back) into a private
// accumulator; the accumulators are added up at the end. index (optional): row j is
// rows[index[j]] (CATS' kept rows, asked for ahead as in kept_dots).
template <typename T>
static void weighted_rows(const float* weight, const T* rows, int64_t count, int64_t dim,
                          const int64_t* index, float* out) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                   count / 256 + 1));
  const int64_t ahead = rows_ahead(dim * int64_t(sizeof(T)));
  std::vector<float> partial(threads * dim, 0.f);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      float* acc = partial.data() + t * dim;
      const int64_t first_row = t * count / threads, last_row = (t + 1) * count / threads;
      if (!index) {
        int64_t j = first_row;
#if CAPRESE_SIMD == 8
        if constexpr (std::is_same_v<T, float>)
          for (; j + 4 <= last_row; j += 4) axpy4(weight + j, rows + j * dim, acc, dim);
#endif
        for (; j < last_row; ++j) axpy(weight[j], rows + j * dim, acc, dim);
        continue;
      }
      for (int64_t j = first_row; j < std::min(last_row, first_row + ahead); ++j)
        prefetch_row(rows + index[j] * dim, dim);
      for (int64_t j = first_row; j < last_row; ++j)
        axpy(weight[j], rows + index[j] * dim, acc, dim,
             rows + index[std::min(j + ahead, last_row - 1)] * dim);
    }
  });
  for (int64_t d = 0; d < dim; ++d) {
    const int64_t at = unpacked_at<T>(d, dim);
    float total = 0.f;
    for (int64_t t = 0; t < threads; ++t) total += partial[t * dim + at];
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
                     int64_t d_ff, const float* x, const at::BFloat16* x_bf16, int64_t dim,
                     float* out) {
  std::vector<int64_t> kept;
  std::vector<float> gate;
  kept.reserve(n_rows);
  gate.reserve(n_rows);
  for (int64_t j = 0; j < d_ff; ++j)
    if (std::abs(act[j]) > tau) { kept.push_back(j); gate.push_back(act[j]); }
  for (int64_t j = d_ff; j < n_rows; ++j) { kept.push_back(j); gate.push_back(1.f); }
  const int64_t count = kept.size();
  std::vector<float> hidden(count);
  kept_dots(up, x, x_bf16, dim, kept.data(), count, hidden.data());
  for (int64_t j = 0; j < count; ++j) hidden[j] *= gate[j];
  weighted_rows(hidden.data(), down, count, dim, kept.data(), out);
}

torch::Tensor cats_decode(torch::Tensor act, torch::Tensor tau, torch::Tensor up,
                          torch::Tensor down, torch::Tensor x) {
  TORCH_CHECK(tau.numel() == 1, "tau must hold one threshold");
  TORCH_CHECK(up.dim() == 2 && up.is_contiguous() && down.is_contiguous() &&
              up.sizes() == down.sizes() && up.scalar_type() == down.scalar_type(),
              "up and down rows must be contiguous (rows x dim) tensors of one shape");
  TORCH_CHECK(up.scalar_type() == at::kFloat || up.scalar_type() == at::kBFloat16,
              "weights must be float32 or bfloat16");
  TORCH_CHECK(act.scalar_type() == at::kFloat && act.is_contiguous() && x.is_contiguous(),
              "act must be contiguous float32, x contiguous");
  TORCH_CHECK(x.numel() == up.size(1) && act.numel() <= up.size(0), "shape mismatch");
  const auto [xf, x_bf16] = float_and_bf16(x);
  auto out = torch::empty({up.size(1)}, xf.options());
  if (up.scalar_type() == at::kFloat)
    cats_mlp(act.data_ptr<float>(), tau.item<float>(), up.data_ptr<float>(),
             down.data_ptr<float>(), up.size(0), act.numel(), xf.data_ptr<float>(), nullptr,
             up.size(1), out.data_ptr<float>());
  else
    cats_mlp(act.data_ptr<float>(), tau.item<float>(), up.data_ptr<at::BFloat16>(),
             down.data_ptr<at::BFloat16>(), up.size(0), act.numel(), xf.data_ptr<float>(),
             x_bf16, up.size(1), out.data_ptr<float>());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("abs_order_statistic", &abs_order_statistic);
  m.def("abs_histogram", &abs_histogram);
}

TORCH_LIBRARY(caprese, m) {
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  m.def("rows_product(Tensor x, Tensor rows) -> Tensor");
  m.def("cats_decode(Tensor act, Tensor tau, Tensor up, Tensor down, Tensor x) -> Tensor");
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor mask, float scale)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(caprese, CPU, m) {
  m.impl("linear", &linear);
  m.impl("rows_product", &rows_product);
  m.impl("cats_decode", &cats_decode);
  m.impl("decode_attention", &decode_attention);
}
