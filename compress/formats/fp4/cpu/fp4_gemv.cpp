// Fused GEMV over packed 4-bit table codes: decode in registers, never a dense weight.
//
// qweight (N, ceil(K/2)) uint8, two codes a byte, low nibble first (column 2j in the low
// nibble of byte j); scales (N, G) as the format stores them: float32 multipliers (NF4, FP4),
// or uint8 codes (E8M0, E4M3) that scale_lut (256,) float32 decodes (NVFP4's tensor scale
// folded in by the caller); lut (16,) float32, code -> value; x (M, K) float32. Returns (M, N)
// float32:
//
//     y[m, n] = sum_k lut[code[n, k]] * scale[n, k / block] * x[m, k]
//
// in fp32. The reference kernel rounds each weight to the activation dtype first; these paths do
// not (more exact, and fewer operations a weight), so in bf16 the two differ by that rounding and
// the order of the sums, like the integer and FP8 formats' kernels.
//
// The AVX-512 path (blocks a multiple of 32) takes 32 codes (16 bytes) a step: the bytes become
// sixteen 32-bit lanes, their low and high nibbles index one 16-entry permute each (the even and
// the odd columns), multiplied by the activations split into even and odd columns once a call;
// each block's sum is scaled once. The AVX2 path decodes 8 codes (4 bytes) at a time: the
// nibbles become eight 32-bit lanes, two 8-entry permutes look both halves of the table up, bit
// 3 picks one (a blend on the lane's sign after a shift). It needs even block starts (an even
// block size); odd ones take the portable loop.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FP4_AVX2 1
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#define FP4_AVX512 1
#endif

namespace {

constexpr int kMaxRows = 8;

inline float table_value(const uint8_t* q, int64_t k, const float* lut) {
  const uint8_t byte = q[k >> 1];
  return lut[(k & 1) ? (byte >> 4) : (byte & 0x0F)];
}

void row_portable(const float* x, int64_t m_rows, int64_t k_cols, const uint8_t* q,
                  const float* s, const float* lut, int64_t block, float* out) {
  for (int64_t m = 0; m < m_rows; ++m) out[m] = 0.f;
  for (int64_t k = 0; k < k_cols; ++k) {
    const float w = table_value(q, k, lut) * s[k / block];
    for (int64_t m = 0; m < m_rows; ++m) out[m] += w * x[m * k_cols + k];
  }
}

#ifdef FP4_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// M activation rows as a template parameter: the accumulators stay in registers. Two
// independent accumulators per row (16 codes a step) hide the FMA latency.
template <int M>
void row_avx2(const float* x, int64_t k_cols, const uint8_t* q, const float* s,
              const float* lut, int64_t block, float* out) {
  const __m256 lut_lo = _mm256_loadu_ps(lut);
  const __m256 lut_hi = _mm256_loadu_ps(lut + 8);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  // 8 codes (4 bytes) -> their weights: table value times the block scale
  auto decode = [&](const uint8_t* bytes, __m256 scale) {
    uint32_t word;
    std::memcpy(&word, bytes, 4);
    const __m256i idx = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), nibble);
    const __m256 low = _mm256_permutevar8x32_ps(lut_lo, idx);
    const __m256 high = _mm256_permutevar8x32_ps(lut_hi, idx);
    const __m256 value =
        _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    return _mm256_mul_ps(value, scale);
  };
  __m256 even[M], odd[M];
  float tail[M];
  for (int m = 0; m < M; ++m) {
    even[m] = odd[m] = _mm256_setzero_ps();
    tail[m] = 0.f;
  }
  for (int64_t start = 0, g = 0; start < k_cols; start += block, ++g) {
    const int64_t stop = std::min(start + block, k_cols);
    const __m256 scale = _mm256_set1_ps(s[g]);
    int64_t k = start;
    for (; k + 16 <= stop; k += 16) {
      const __m256 w0 = decode(q + (k >> 1), scale);
      const __m256 w1 = decode(q + (k >> 1) + 4, scale);
      for (int m = 0; m < M; ++m) {
        even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * k_cols + k), even[m]);
        odd[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * k_cols + k + 8), odd[m]);
      }
    }
    for (; k + 8 <= stop; k += 8) {
      const __m256 w0 = decode(q + (k >> 1), scale);
      for (int m = 0; m < M; ++m)
        even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * k_cols + k), even[m]);
    }
    for (; k < stop; ++k) {  // a partial block's last codes
      const uint8_t byte = q[k >> 1];
      const float w = lut[(k & 1) ? (byte >> 4) : (byte & 0x0F)] * s[g];
      for (int m = 0; m < M; ++m) tail[m] += w * x[m * k_cols + k];
    }
  }
  for (int m = 0; m < M; ++m) out[m] = hsum(_mm256_add_ps(even[m], odd[m])) + tail[m];
}

template <int M>
void rows_avx2(const float* x, int64_t m_rows, int64_t k_cols, const uint8_t* q,
               const float* s, const float* lut, int64_t block, float* out) {
  if constexpr (M > 1) {
    if (m_rows < M) return rows_avx2<M - 1>(x, m_rows, k_cols, q, s, lut, block, out);
  }
  row_avx2<M>(x, k_cols, q, s, lut, block, out);
}
#endif

#ifdef FP4_AVX512
// xe / xo: the activations' even and odd columns, M rows of `half` each (see the header).
template <int M>
void row_avx512(const float* x, const float* xe, const float* xo, int64_t half, int64_t k_cols,
                const uint8_t* q, const float* s, const float* lut, int64_t block, float* out) {
  const __m512 table = _mm512_loadu_ps(lut);
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  __m512 acc[M];
  float tail[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t start = 0, g = 0; start < k_cols; start += block, ++g) {
    const int64_t stop = std::min(start + block, k_cols);
    __m512 even[M], odd[M];
    for (int m = 0; m < M; ++m) {
      even[m] = odd[m] = _mm512_setzero_ps();
      tail[m] = 0.f;
    }
    int64_t k = start;
    for (; k + 32 <= stop; k += 32) {
      const __m512i bytes =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k >> 1))));
      const __m512 we = _mm512_permutexvar_ps(_mm512_and_si512(bytes, nibble), table);
      const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
      for (int m = 0; m < M; ++m) {
        even[m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xe + m * half + (k >> 1)), even[m]);
        odd[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xo + m * half + (k >> 1)), odd[m]);
      }
    }
    for (; k < stop; ++k) {  // a partial last block
      const float w = table_value(q, k, lut);
      for (int m = 0; m < M; ++m) tail[m] += w * x[m * k_cols + k];
    }
    const __m512 scale = _mm512_set1_ps(s[g]);
    for (int m = 0; m < M; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(even[m], odd[m]),
                                       _mm512_castps128_ps512(_mm_set_ss(tail[m])));
      acc[m] = _mm512_fmadd_ps(sum, scale, acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}

// Blocks of 16 or 32 (NVFP4, MXFP4) with K a multiple of 32: no per-block sums to close; each
// step's weights take their scales (one, or one per half of the lanes) before the FMA.
template <int M>
void row_avx512_narrow(const float* xe, const float* xo, int64_t half, int64_t k_cols,
                       const uint8_t* q, const float* s, const float* lut, int64_t block,
                       float* out) {
  const __m512 table = _mm512_loadu_ps(lut);
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  __m512 even[M], odd[M];
  for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm512_setzero_ps();
  const int64_t per_step = 32 / block;  // scale groups a step covers: 1 or 2
  for (int64_t k = 0, g = 0; k < k_cols; k += 32, g += per_step) {
    // lanes 0-7 hold columns 0-15 of the step (even or odd), lanes 8-15 columns 16-31
    const __m512 scale =
        per_step == 1 ? _mm512_set1_ps(s[g])
                      : _mm512_insertf32x8(_mm512_set1_ps(s[g]), _mm256_set1_ps(s[g + 1]), 1);
    const __m512i bytes =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k >> 1))));
    const __m512 we =
        _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, nibble), table), scale);
    const __m512 wo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table),
                                    scale);
    for (int m = 0; m < M; ++m) {
      even[m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xe + m * half + (k >> 1)), even[m]);
      odd[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xo + m * half + (k >> 1)), odd[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(even[m], odd[m]));
}

template <int M>
void rows_avx512(const float* x, const float* xe, const float* xo, int64_t half,
                 int64_t m_rows, int64_t k_cols, const uint8_t* q, const float* s,
                 const float* lut, int64_t block, float* out) {
  if constexpr (M > 1) {
    if (m_rows < M)
      return rows_avx512<M - 1>(x, xe, xo, half, m_rows, k_cols, q, s, lut, block, out);
  }
  if (block <= 32 && k_cols % 32 == 0) {
    return row_avx512_narrow<M>(xe, xo, half, k_cols, q, s, lut, block, out);
  }
  row_avx512<M>(x, xe, xo, half, k_cols, q, s, lut, block, out);
}
#endif

}  // namespace

bool vectorized() {
#if defined(FP4_AVX2) || defined(FP4_AVX512)
  return true;
#else
  return false;
#endif
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                   torch::Tensor scale_lut, torch::Tensor lut, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous (M, K) float32 tensor");
  TORCH_CHECK(x.size(0) <= kMaxRows, "gemv takes at most ", kMaxRows, " rows");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous(), "qweight");
  const bool coded = scales.scalar_type() == torch::kUInt8;
  TORCH_CHECK((coded || scales.scalar_type() == torch::kFloat32) && scales.is_contiguous(),
              "scales must be contiguous float32 or uint8");
  TORCH_CHECK(!coded || (scale_lut.scalar_type() == torch::kFloat32 && scale_lut.numel() == 256),
              "uint8 scales need a 256-entry float32 scale_lut");
  TORCH_CHECK(lut.scalar_type() == torch::kFloat32 && lut.numel() == 16, "lut");
  const int64_t m_rows = x.size(0), k_cols = x.size(1), n_rows = qweight.size(0);
  const int64_t row_bytes = qweight.size(1), groups = scales.size(1);
  TORCH_CHECK(row_bytes == (k_cols + 1) / 2, "qweight has ", row_bytes, " bytes a row for K=",
              k_cols);
  TORCH_CHECK(block > 0 && groups == (k_cols + block - 1) / block, "scales do not match");
  auto result = torch::empty({n_rows, m_rows}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float* sp = coded ? nullptr : scales.data_ptr<float>();
  const uint8_t* cp = coded ? scales.data_ptr<uint8_t>() : nullptr;
  const float* dp = coded ? scale_lut.data_ptr<float>() : nullptr;
  const float* lp = lut.data_ptr<float>();
  float* op = result.data_ptr<float>();
#ifdef FP4_AVX512
  // the activations' even and odd columns (the low and the high nibbles), once a call
  const int64_t half = (k_cols + 1) / 2;
  // blocks of 32 and more (a multiple of 32), or 16 / 32 with whole steps of 32 columns
  const bool wide = block % 32 == 0 || (block == 16 && k_cols % 32 == 0);
  std::vector<float> split(wide ? 2 * m_rows * half : 0, 0.f);
  float* xe = split.data();
  float* xo = wide ? split.data() + m_rows * half : nullptr;
  for (int64_t m = 0; wide && m < m_rows; ++m) {
    for (int64_t k = 0; k < k_cols; ++k) {
      (k & 1 ? xo : xe)[m * half + (k >> 1)] = xp[m * k_cols + k];
    }
  }
#endif
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> decoded(coded ? groups : 0);
    for (int64_t n = begin; n < end; ++n) {
      const float* row_scales = coded ? nullptr : sp + n * groups;
      if (coded) {
        for (int64_t g = 0; g < groups; ++g) decoded[g] = dp[cp[n * groups + g]];
        row_scales = decoded.data();
      }
      const uint8_t* qn = qp + n * row_bytes;
      float* on = op + n * m_rows;
#ifdef FP4_AVX512
      if (wide) {
        rows_avx512<kMaxRows>(xp, xe, xo, half, m_rows, k_cols, qn, row_scales, lp, block, on);
        continue;
      }
#endif
#ifdef FP4_AVX2
      if (block % 2 == 0) {
        rows_avx2<kMaxRows>(xp, m_rows, k_cols, qn, row_scales, lp, block, on);
        continue;
      }
#endif
      row_portable(xp, m_rows, k_cols, qn, row_scales, lp, block, on);
    }
  });
  return result.t().contiguous();  // (N, M) -> (M, N)
}
