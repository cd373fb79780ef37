// CATS' threshold: the rank-th smallest |value| of a prompt's gate activations, exactly,
// without sorting or copying them; a part of cpu_kernels.cpp.
#pragma once
#include "simd.h"

// The bit pattern of |v| read as an integer orders like |v|; bf16 is the high half of fp32.
static inline uint32_t abs_bits(float v) {
  uint32_t bits; std::memcpy(&bits, &v, 4); return bits & 0x7fffffffu;
}
static inline uint32_t abs_bits(at::BFloat16 v) {
  return (uint32_t(reinterpret_cast<const uint16_t&>(v)) & 0x7fffu) << 16;
}

// Counts of the 16 bits of abs_bits(v) >> shift, over valid rows (and, for the low half,
// only values whose high half is `high`), one histogram per thread summed at the end.
template <typename T>
static std::vector<int64_t> histogram(const T* values, const bool* valid, int64_t rows,
                                      int64_t cols, int shift, int64_t high) {
  const int64_t bins = 1 << 16, threads = at::get_num_threads();
  std::vector<int64_t> partial(threads * bins, 0);
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    int64_t* counts = partial.data() + at::get_thread_num() * bins;
    for (int64_t r = first; r < last; ++r) {
      if (!valid[r]) continue;
      const T* row = values + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const uint32_t bits = abs_bits(row[c]);
        if (high < 0) counts[bits >> 16]++;
        else if (int64_t(bits >> 16) == high) counts[bits & 0xffffu]++;
      }
    }
  });
  std::vector<int64_t> counts(bins, 0);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t b = 0; b < bins; ++b) counts[b] += partial[t * bins + b];
  return counts;
}

// The bin holding the rank-th smallest entry; rank becomes its rank inside that bin.
static int64_t bin_of(const std::vector<int64_t>& counts, int64_t& rank) {
  for (int64_t b = 0; b < int64_t(counts.size()); ++b) {
    if (rank < counts[b]) return b;
    rank -= counts[b];
  }
  TORCH_CHECK(false, "rank beyond the number of valid values");
}

// Radix select: exact, two passes over fp32 values (one for bf16), no copies and no sort.
template <typename T>
static float radix_select(const T* values, const bool* valid, int64_t rows, int64_t cols,
                          int64_t rank) {
  const int64_t high = bin_of(histogram(values, valid, rows, cols, 16, -1), rank);
  uint32_t bits = uint32_t(high) << 16;
  if (sizeof(T) == 4) bits |= uint32_t(bin_of(histogram(values, valid, rows, cols, 0, high), rank));
  float out; std::memcpy(&out, &bits, 4); return out;
}

static float from_bits(uint32_t bits) { float out; std::memcpy(&out, &bits, 4); return out; }

// The bracket pass over one row, 16 values at a time with AVX-512: a compare and a
// popcount for the values below lo, a compress-store for those inside [lo, hi] (no branch
// per value: the scalar loop spent ~3 ns a value, 55 ms per layer of the 1.5B model at 2048
// tokens). Returns how many leading values it covered; the caller does the rest.
#if defined(__AVX512F__)
static inline __m512i abs_bits16(const float* p) {
  return _mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(0x7fffffff));
}
static inline __m512i abs_bits16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_and_si512(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16),
                          _mm512_set1_epi32(0x7fffffff));
}
#endif
template <typename T>
static int64_t bracket_row(const T* row, int64_t cols, uint32_t lo, uint32_t hi,
                           int64_t& under, std::vector<uint32_t>& inside) {
#if defined(__AVX512F__)
  const __m512i low = _mm512_set1_epi32(int(lo)), high = _mm512_set1_epi32(int(hi));
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    const __m512i bits = abs_bits16(row + c);  // non-negative: signed compares order them
    under += __builtin_popcount(_mm512_cmplt_epi32_mask(bits, low));
    const __mmask16 in = _mm512_cmpge_epi32_mask(bits, low) & _mm512_cmple_epi32_mask(bits, high);
    if (in) {
      const size_t size = inside.size();
      inside.resize(size + 16);
      _mm512_mask_compressstoreu_epi32(inside.data() + size, in, bits);
      inside.resize(size + __builtin_popcount(in));
    }
  }
  return c;
#else
  return 0;
#endif
}

// Bracket, then select: a strided sample of ~16K values gives bounds [lo, hi] that hold the
// wanted rank with near certainty; one pass counts the values below lo and keeps those in
// [lo, hi] (a few percent), and nth_element finds the rank among them. One streaming
// comparison per value instead of two histogram passes. If the rank falls outside the
// bracket (a sample that misled), the radix select answers instead: exact either way.
template <typename T>
static float order_statistic(const T* values, const bool* valid, int64_t rows, int64_t cols,
                             int64_t rank) {
  std::vector<int64_t> valid_rows;
  for (int64_t r = 0; r < rows; ++r) if (valid[r]) valid_rows.push_back(r);
  const int64_t count = int64_t(valid_rows.size()) * cols;
  const int64_t wanted = 16384;
  if (count < 8 * wanted) return radix_select(values, valid, rows, cols, rank);
  const int64_t stride = (count / wanted) | 1;  // odd: does not alias the neuron columns
  std::vector<uint32_t> sample;
  for (int64_t i = 0; i < count; i += stride) {
    const int64_t r = valid_rows[i / cols], c = i % cols;
    sample.push_back(abs_bits(values[r * cols + c]));
  }
  const int64_t m = sample.size();
  const double q = double(rank) / double(count - 1);
  const int64_t margin = int64_t(4.0 * std::sqrt(q * (1.0 - q) * m)) + 16;
  const int64_t at = int64_t(q * (m - 1));
  const int64_t lo_at = std::max<int64_t>(0, at - margin), hi_at = std::min<int64_t>(m - 1, at + margin);
  std::nth_element(sample.begin(), sample.begin() + lo_at, sample.end());
  const uint32_t lo = sample[lo_at];
  std::nth_element(sample.begin() + lo_at, sample.begin() + hi_at, sample.end());
  const uint32_t hi = sample[hi_at];
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> below(threads, 0);
  std::vector<std::vector<uint32_t>> inside(threads);
  at::parallel_for(0, int64_t(valid_rows.size()), 1, [&](int64_t first, int64_t last) {
    const int64_t t = at::get_thread_num();
    int64_t under = 0;
    for (int64_t j = first; j < last; ++j) {
      const T* row = values + valid_rows[j] * cols;
      const int64_t c = bracket_row(row, cols, lo, hi, under, inside[t]);
      for (int64_t tail = c; tail < cols; ++tail) {
        const uint32_t bits = abs_bits(row[tail]);
        under += bits < lo;
        if (bits >= lo && bits <= hi) inside[t].push_back(bits);
      }
    }
    below[t] += under;
  });
  int64_t under = 0;
  std::vector<uint32_t> kept;
  for (int64_t t = 0; t < threads; ++t) {
    under += below[t];
    kept.insert(kept.end(), inside[t].begin(), inside[t].end());
  }
  if (rank < under || rank >= under + int64_t(kept.size()))
    return radix_select(values, valid, rows, cols, rank);
  std::nth_element(kept.begin(), kept.begin() + (rank - under), kept.end());
  return from_bits(kept[rank - under]);
}

double abs_order_statistic(torch::Tensor values, torch::Tensor valid, int64_t rank) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), "values must be a contiguous matrix");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.is_contiguous() &&
              valid.numel() == values.size(0), "valid must hold one bool per row");
  TORCH_CHECK(rank >= 0, "rank must be non-negative");
  if (values.scalar_type() == at::kFloat)
    return order_statistic(values.data_ptr<float>(), valid.data_ptr<bool>(), values.size(0),
                           values.size(1), rank);
  TORCH_CHECK(values.scalar_type() == at::kBFloat16, "values must be float32 or bfloat16");
  return order_statistic(values.data_ptr<at::BFloat16>(), valid.data_ptr<bool>(),
                         values.size(0), values.size(1), rank);
}

// Counts of each 15-bit magnitude pattern (sign dropped) of 16-bit floats over valid rows:
// CATS' threshold for a prompt fed in pieces (the counts of the pieces add up). The radix
// select's first histogram, read as bf16 whatever the 16-bit type: only bits are counted.
torch::Tensor abs_histogram(torch::Tensor values, torch::Tensor valid) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), "values must be a contiguous matrix");
  TORCH_CHECK(values.element_size() == 2, "values must be a 16-bit float type");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.is_contiguous() &&
              valid.numel() == values.size(0), "valid must hold one bool per row");
  const auto counts = histogram(reinterpret_cast<const at::BFloat16*>(values.data_ptr()),
                                valid.data_ptr<bool>(), values.size(0), values.size(1), 16, -1);
  return torch::from_blob(const_cast<int64_t*>(counts.data()), {1 << 15}, torch::kInt64).clone();
}
