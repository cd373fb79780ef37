// One decode token's grouped-query attention over a KV cache (caprese.kernels.attention),
// a part of cpu_kernels.cpp.
#pragma once
#include "simd.h"

// One decode token's attention, for caprese.kernels.attention. PyTorch's batched products
// read a KV cache that the weights streamed since have pushed out of the caches, without
// fetching ahead, and read a static cache's masked tail too. Here each KV head's keys, then
// its values, are read once, front to back, for all the query heads that share it (their
// sums in registers), only at the positions the mask leaves open: an additive mask of -1e30
// or less weighs a position exactly 0 in float32. The arithmetic is a compiled step's:
// scores rounded to the cache's dtype, as the product stores them, then scaled, masked and
// normalized in float32; the weights rounded to the dtype before they weigh the values; the
// sums in float32.
template <typename T>
static inline float as_stored(float v) {  // v as a tensor of T holds it
  if constexpr (std::is_same_v<T, at::BFloat16>) return static_cast<float>(at::BFloat16(v));
  return v;
}

constexpr int64_t kPositionsAhead = 8;
constexpr int kHeadsPerPass = 6;  // query heads whose sums stay in registers at once

// run(std::integral_constant<int, G>(), first) for the query heads first .. first + G - 1,
// in passes of at most kHeadsPerPass heads (G a constant, so the sums are registers).
template <typename Run>
static void in_head_passes(int64_t group, Run&& run) {
  for (int64_t first = 0; first < group; first += kHeadsPerPass) {
    switch (std::min<int64_t>(kHeadsPerPass, group - first)) {
      case 1: run(std::integral_constant<int, 1>(), first); break;
      case 2: run(std::integral_constant<int, 2>(), first); break;
      case 3: run(std::integral_constant<int, 3>(), first); break;
      case 4: run(std::integral_constant<int, 4>(), first); break;
      case 5: run(std::integral_constant<int, 5>(), first); break;
      default: run(std::integral_constant<int, 6>(), first);
    }
  }
}

// scores (G rows of n) = q (G rows of dim, float) . the keys at positions open[0 .. n-1].
template <int G, typename T>
static void score_keys(const float* q, const T* k, int64_t step, const int64_t* open, int64_t n,
                       int64_t dim, float* scores) {
  for (int64_t j = 0; j < n; ++j) {
    if (j + kPositionsAhead < n) prefetch_row(k + open[j + kPositionsAhead] * step, dim);
    const T* key = k + open[j] * step;
    float sums[G] = {};
    int64_t d = 0;
#if defined(CAPRESE_SIMD)
    vec acc[G];
    for (int g = 0; g < G; ++g) acc[g] = vzero();
    for (; d + CAPRESE_SIMD <= dim; d += CAPRESE_SIMD) {
      const vec x = vload(key + d);
      for (int g = 0; g < G; ++g) acc[g] = vfma(vload(q + g * dim + d), x, acc[g]);
    }
    for (int g = 0; g < G; ++g) sums[g] = vsum(acc[g]);
#endif
    for (; d < dim; ++d)
      for (int g = 0; g < G; ++g) sums[g] += q[g * dim + d] * to_float(key[d]);
    for (int g = 0; g < G; ++g) scores[g * n + j] = sums[g];
  }
}

#if defined(__AVX512BF16__)
// The sums of 16 vectors, lane p of the result the sum of s[p]: a transpose by halves, each
// step adding pairs, about 3 instructions a sum instead of 8 for each vector's own.
static inline __m512 sum_each_of_16(__m512 s[16]) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // a 128-bit lane: 2 partial sums each of s[2i], s[2i + 1]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * i], s[2 * i + 1]),
                         _mm512_unpackhi_ps(s[2 * i], s[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // a 128-bit lane: one partial sum each of s[4i .. 4i + 3]
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // the 128-bit lanes of u[2i], u[2i + 1] added in pairs
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88),
                       _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
}

// score_keys for bf16 queries and keys: 32 query-key pairs per instruction (the products
// exact, as the widened ones are), q as G rows of dim bf16 values. Where dim is a multiple
// of 32, positions go in blocks of 16, one head at a time over a block (its keys read from
// memory once, then from the first-level cache), and each head's 16 sums reduce together.
template <int G>
static void score_keys_in_pairs(const at::BFloat16* q, const at::BFloat16* k, int64_t step,
                                const int64_t* open, int64_t n, int64_t dim, float* scores) {
  const int64_t whole = dim / 32 * 32;
  int64_t j = 0;
  for (; whole == dim && j + 16 <= n; j += 16) {
    for (int64_t p = 16; p < 32 && j + p < n; ++p) prefetch_row(k + open[j + p] * step, dim);
    const at::BFloat16* key[16];
    for (int p = 0; p < 16; ++p) key[p] = k + open[j + p] * step;
    for (int g = 0; g < G; ++g) {
      __m512 acc[16];
      for (int p = 0; p < 16; ++p) acc[p] = vzero();
      for (int64_t d = 0; d < dim; d += 32) {
        const __m512bh query = (__m512bh)_mm512_loadu_si512(q + g * dim + d);
        for (int p = 0; p < 16; ++p)
          acc[p] = _mm512_dpbf16_ps(acc[p], query, (__m512bh)_mm512_loadu_si512(key[p] + d));
      }
      _mm512_storeu_ps(scores + g * n + j, sum_each_of_16(acc));
    }
  }
  for (; j < n; ++j) {
    if (j + kPositionsAhead < n) prefetch_row(k + open[j + kPositionsAhead] * step, dim);
    const at::BFloat16* key = k + open[j] * step;
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = vzero();
    for (int64_t d = 0; d < whole; d += 32) {
      const __m512bh pairs = (__m512bh)_mm512_loadu_si512(key + d);
      for (int g = 0; g < G; ++g)
        acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_loadu_si512(q + g * dim + d), pairs);
    }
    for (int g = 0; g < G; ++g) {
      float sum = vsum(acc[g]);
      for (int64_t d = whole; d < dim; ++d) sum += to_float(q[g * dim + d]) * to_float(key[d]);
      scores[g * n + j] = sum;
    }
  }
}
#endif

// out (G rows of dim, float) = weights (G rows of n) times the values at open[0 .. n-1],
// kValueVectors vectors' width of every head at a time, their sums in registers.
#if CAPRESE_SIMD == 16
constexpr int kValueVectors = 4;
#else
constexpr int kValueVectors = 2;
#endif
// (From dimension `d0` on: the dimensions before it may have been weighed by another way.)
template <int G, typename T>
static void weigh_values(const float* weights, const T* v, int64_t step, const int64_t* open,
                         int64_t n, int64_t dim, float* out, int64_t d0 = 0) {
#if defined(CAPRESE_SIMD)
  constexpr int64_t width = kValueVectors * CAPRESE_SIMD;
  for (; d0 + width <= dim; d0 += width) {
    vec acc[G][kValueVectors];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < kValueVectors; ++c) acc[g][c] = vzero();
    for (int64_t j = 0; j < n; ++j) {
      const T* row = v + open[j] * step + d0;
      if (d0 == 0 && j + kPositionsAhead < n)
        prefetch_row(v + open[j + kPositionsAhead] * step, dim);
      vec x[kValueVectors];
      for (int c = 0; c < kValueVectors; ++c) x[c] = vload(row + c * CAPRESE_SIMD);
      for (int g = 0; g < G; ++g) {
        const vec w = vset(weights[g * n + j]);
        for (int c = 0; c < kValueVectors; ++c) acc[g][c] = vfma(w, x[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < kValueVectors; ++c)
        vstore(out + g * dim + d0 + c * CAPRESE_SIMD, acc[g][c]);
  }
#endif
  for (; d0 < dim; ++d0)
    for (int g = 0; g < G; ++g) {
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j)
        total += weights[g * n + j] * to_float(v[open[j] * step + d0]);
      out[g * dim + d0] = total;
    }
}

#if defined(__AVX512BF16__)
// weigh_values for bf16 values and weights (bf16 already: softmax_in_place rounds them), two
// positions per instruction: positions j and j + 1 have their value rows interleaved into
// bf16 pairs, each met by the pair of a head's two weights (the products exact, as the
// widened ones are). An odd last position pairs with itself at weight 0. Dimensions past
// the last whole 64 go to weigh_values.
// _mm512_permutex2var_epi16 indices that interleave two rows of 32 bf16 values (0-31: the
// first row, 32-63: the second) into pairs: element 2i from the first row, 2i + 1 from the
// second, for the rows' elements 0-15 (low) and 16-31 (high).
alignas(64) static constexpr int16_t kPairsLow[32] = {
    0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) static constexpr int16_t kPairsHigh[32] = {
    16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

template <int G>
static void weigh_values_in_pairs(const float* weights, const at::BFloat16* v, int64_t step,
                                  const int64_t* open, int64_t n, int64_t dim, float* out) {
  const int64_t halves = (n + 1) / 2, whole = dim / 64 * 64;
  std::vector<uint32_t> pairs(G * halves);  // a head's weights j, j + 1 as one bf16 pair
  for (int g = 0; g < G; ++g)
    for (int64_t h = 0; h < halves; ++h) {
      uint32_t first, second = 0;
      std::memcpy(&first, weights + g * n + 2 * h, 4);
      if (2 * h + 1 < n) std::memcpy(&second, weights + g * n + 2 * h + 1, 4);
      pairs[g * halves + h] = (first >> 16) | (second & 0xffff0000u);
    }
  const __m512i take_low = _mm512_load_si512(kPairsLow);
  const __m512i take_high = _mm512_load_si512(kPairsHigh);
  for (int64_t d0 = 0; d0 < whole; d0 += 64) {
    __m512 acc[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) acc[g][c] = vzero();
    for (int64_t h = 0; h < halves; ++h) {
      const int64_t j = 2 * h, j2 = j + 1 < n ? j + 1 : j;
      if (d0 == 0 && j + kPositionsAhead + 1 < n) {
        prefetch_row(v + open[j + kPositionsAhead] * step, dim);
        prefetch_row(v + open[j + kPositionsAhead + 1] * step, dim);
      }
      const at::BFloat16* a = v + open[j] * step + d0;
      const at::BFloat16* b = v + open[j2] * step + d0;
      __m512bh x[4];
      for (int c = 0; c < 2; ++c) {
        const __m512i ra = _mm512_loadu_si512(a + 32 * c), rb = _mm512_loadu_si512(b + 32 * c);
        x[2 * c] = (__m512bh)_mm512_permutex2var_epi16(ra, take_low, rb);
        x[2 * c + 1] = (__m512bh)_mm512_permutex2var_epi16(ra, take_high, rb);
      }
      for (int g = 0; g < G; ++g) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(int(pairs[g * halves + h]));
        for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], w, x[c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) vstore(out + g * dim + d0 + 16 * c, acc[g][c]);
  }
  if (whole < dim) weigh_values<G>(weights, v, step, open, n, dim, out, whole);
}
#endif

// One head's n scores in place into its softmax weights, as a compiled step computes them:
// each score rounded to T (as the product stores it), scaled, masked (mask_open: the mask at
// the open positions, or null), e^(score - the largest), normalized and rounded to T.
template <typename T>
static void softmax_in_place(float* w, const float* mask_open, int64_t n, float scale) {
  constexpr bool bf16 = std::is_same_v<T, at::BFloat16>;
  float top = -INFINITY, total = 0.f;
  int64_t j = 0;
#if defined(CAPRESE_SIMD)
  vec tops = vset(-INFINITY);
  for (; j + CAPRESE_SIMD <= n; j += CAPRESE_SIMD) {
    vec x = vmul(bf16 ? vround_bf16(vload(w + j)) : vload(w + j), vset(scale));
    if (mask_open) x = vadd(x, vload(mask_open + j));
    vstore(w + j, x);
    tops = vmax(tops, x);
  }
  top = vmax_of(tops);
#endif
  for (; j < n; ++j) {
    w[j] = as_stored<T>(w[j]) * scale + (mask_open ? mask_open[j] : 0.f);
    top = std::max(top, w[j]);
  }
  j = 0;
#if defined(CAPRESE_SIMD)
  vec totals = vzero();
  for (; j + CAPRESE_SIMD <= n; j += CAPRESE_SIMD) {
    const vec e = vexp(vsub(vload(w + j), vset(top)));
    vstore(w + j, e);
    totals = vadd(totals, e);
  }
  total = vsum(totals);
#endif
  for (; j < n; ++j) total += (w[j] = std::exp(w[j] - top));
  j = 0;
#if defined(CAPRESE_SIMD)
  for (; j + CAPRESE_SIMD <= n; j += CAPRESE_SIMD) {
    const vec x = vdiv(vload(w + j), vset(total));
    vstore(w + j, bf16 ? vround_bf16(x) : x);
  }
#endif
  for (; j < n; ++j) w[j] = as_stored<T>(w[j] / total);
}

// The `group` query heads q (rows `q_step` apart) of one KV head: keys and values at
// positions `step` apart, mask (per position, float32) or null; out rows `out_step` apart.
template <typename T>
static void attend(const T* q, int64_t q_step, int64_t group, const T* k, const T* v,
                   int64_t step, const float* mask, int64_t positions, float scale,
                   int64_t dim, T* out, int64_t out_step) {
  std::vector<int64_t> open;
  open.reserve(positions);
  for (int64_t s = 0; s < positions; ++s)
    if (!mask || mask[s] > -1e30f) open.push_back(s);
  if (open.empty())  // nothing open: every position weighs alike, as with the dense product
    for (int64_t s = 0; s < positions; ++s) open.push_back(s);
  const int64_t n = open.size();
  std::vector<float> mask_open(mask ? n : 0);
  for (int64_t j = 0; j < int64_t(mask_open.size()); ++j) mask_open[j] = mask[open[j]];
  std::vector<float> weights(group * n), sums(group * dim);
  bool scored = false;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    std::vector<at::BFloat16> rows(group * dim);
    for (int64_t g = 0; g < group; ++g)
      std::copy(q + g * q_step, q + g * q_step + dim, rows.begin() + g * dim);
    in_head_passes(group, [&](auto heads, int64_t first) {
      score_keys_in_pairs<decltype(heads)::value>(rows.data() + first * dim, k, step,
                                                  open.data(), n, dim,
                                                  weights.data() + first * n);
    });
    scored = true;
  }
#endif
  if (!scored) {
    std::vector<float> qf(group * dim);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = to_float(q[g * q_step + d]);
    in_head_passes(group, [&](auto heads, int64_t first) {
      score_keys<decltype(heads)::value>(qf.data() + first * dim, k, step, open.data(), n,
                                         dim, weights.data() + first * n);
    });
  }
  for (int64_t g = 0; g < group; ++g)
    softmax_in_place<T>(weights.data() + g * n, mask ? mask_open.data() : nullptr, n, scale);
  in_head_passes(group, [&](auto heads, int64_t first) {
    constexpr int G = decltype(heads)::value;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      weigh_values_in_pairs<G>(weights.data() + first * n, v, step, open.data(), n, dim,
                               sums.data() + first * dim);
      return;
    }
#endif
    weigh_values<G>(weights.data() + first * n, v, step, open.data(), n, dim,
                    sums.data() + first * dim);
  });
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < dim; ++d) out[g * out_step + d] = T(sums[g * dim + d]);
}

// query (B, H, 1, D), key and value (B, KV, S, D) with unit stride in D and the same strides,
// mask (B, S) float32 additive or empty; out (B, 1, H, D). Threads split the (B, KV) heads.
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor key, torch::Tensor value,
                               torch::Tensor mask, double scale) {
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1, "query must be (batch, heads, 1, dim)");
  TORCH_CHECK(key.dim() == 4 && key.sizes() == value.sizes() && key.strides() == value.strides()
              && key.stride(3) == 1 && query.stride(3) == 1,
              "key and value must be (batch, kv_heads, positions, dim) alike, dim contiguous");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && key.scalar_type() == value.scalar_type()
              && (key.scalar_type() == at::kFloat || key.scalar_type() == at::kBFloat16),
              "query, key and value must all be float32 or all bfloat16");
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(3);
  const int64_t kv_heads = key.size(1), positions = key.size(2);
  TORCH_CHECK(key.size(0) == batch && key.size(3) == dim && heads % kv_heads == 0,
              "query and key shapes do not match");
  TORCH_CHECK(positions > 0, "the KV cache must hold at least one position");
  const bool masked = mask.numel() > 0;
  TORCH_CHECK(!masked || (mask.scalar_type() == at::kFloat && mask.is_contiguous() &&
                          mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == positions),
              "mask must be a contiguous float32 (batch, positions) tensor, or empty");
  const int64_t group = heads / kv_heads;
  auto out = torch::empty({batch, 1, heads, dim}, query.options());
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const float* row_mask = masked ? mask.data_ptr<float>() + b * positions : nullptr;
      auto run = [&](auto* typed) {
        using T = std::remove_pointer_t<decltype(typed)>;
        const T* q = query.data_ptr<T>() + b * query.stride(0) + h * group * query.stride(1);
        const int64_t at = b * key.stride(0) + h * key.stride(1);
        attend(q, query.stride(1), group, key.data_ptr<T>() + at, value.data_ptr<T>() + at,
               key.stride(2), row_mask, positions, float(scale), dim,
               out.data_ptr<T>() + b * heads * dim + h * group * dim, dim);
      };
      if (key.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
      else run(static_cast<at::BFloat16*>(nullptr));
    }
  });
  return out;
}
