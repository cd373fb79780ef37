// The vector helpers of caprese's CPU kernels (cpu_kernels.cpp and the headers it includes):
// one SIMD vector of floats at this CPU's width, bf16 widened and rounded, e^x, prefetches.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
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
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline float vmax_of(vec v) { return _mm512_reduce_max_ps(v); }
// Each float rounded to the nearest bf16 (ties to even), as c10::BFloat16 rounds; NaN kept.
static inline vec vround_bf16(vec v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  const vec rounded = _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(int(0xffff0000))));
  return _mm512_mask_mov_ps(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}
static inline void vwiden_unpacked(const at::BFloat16* p, vec& lo, vec& hi) {
  const __m512i raw = _mm512_loadu_si512(p), zero = _mm512_setzero_si512();
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));
  hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
}
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
static inline void vwiden_unpacked(const at::BFloat16* p, vec& lo, vec& hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
}
static inline float vsum(vec v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)));
}
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline float vmax_of(vec v) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_shuffle_ps(half, half, 1)));
}
static inline vec vround_bf16(vec v) {  // as the AVX-512 one
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  const vec rounded = _mm256_castsi256_ps(
      _mm256_and_si256(up, _mm256_set1_epi32(int(0xffff0000))));
  return _mm256_blendv_ps(rounded, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
#endif

#if defined(CAPRESE_SIMD)
// e^r for |r| <= ln2 / 2 (Cephes' expf polynomial, within about one float32 ulp).
static inline vec exp_polynomial(vec r) {
  vec p = vset(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                  5.0000001201e-1f})
    p = vfma(p, r, vset(c));
  return vfma(vmul(p, r), r, vadd(r, vset(1.f)));
}
// e^x as x = n ln2 + r: the polynomial times 2^n; 0 below kExpFloor, where e^x leaves
// float32's normal range (std::exp gives a subnormal there, which weighs nothing in bf16 sums).
constexpr float kExpFloor = -87.3f, kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // ln2 in two parts
#if CAPRESE_SIMD == 16
static inline vec vexp(vec x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, vset(kExpFloor), _CMP_GE_OQ);
  const vec n = _mm512_roundscale_ps(vmul(x, vset(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vec r = _mm512_fnmadd_ps(n, vset(kLn2Low), _mm512_fnmadd_ps(n, vset(kLn2High), x));
  return _mm512_maskz_scalef_ps(live, exp_polynomial(r), n);
}
#else
static inline vec vexp(vec x) {
  const vec live = _mm256_cmp_ps(x, vset(kExpFloor), _CMP_GE_OQ);
  const vec n = _mm256_round_ps(vmul(vmax(x, vset(kExpFloor)), vset(kLog2e)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vec r = _mm256_fnmadd_ps(n, vset(kLn2Low), _mm256_fnmadd_ps(n, vset(kLn2High), x));
  const __m256i two_to_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, vmul(exp_polynomial(r), _mm256_castsi256_ps(two_to_n)));
}
#endif
#endif

// Ask for the cache line holding row[element], into the L2 cache: lines asked for a row or
// more ahead would evict lines of L1 before their use.
constexpr int64_t kLine = 64;  // bytes
template <typename T>
static inline void prefetch_line(const T* row, int64_t element) {
#if defined(CAPRESE_SIMD)
  _mm_prefetch(reinterpret_cast<const char*>(row + element), _MM_HINT_T1);
#endif
}
template <typename T>
static inline void prefetch_row(const T* row, int64_t length) {
  for (int64_t at = 0; at < length; at += kLine / int64_t(sizeof(T))) prefetch_line(row, at);
}
