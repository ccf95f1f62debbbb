// Fused GEMV over packed 4-bit table codes: decode in registers, never a dense weight.
//
// qweight (N, ceil(K/2)) uint8, two codes a byte, low nibble first (column 2j in the low
// nibble of byte j); scales (N, G) as the format stores them: float32 multipliers (NF4, FP4),
// or uint8 codes (E8M0, E4M3) that scale_lut (256,) float32 decodes (NVFP4's tensor scale
// folded in by the caller); lut (16,) float32, code -> value; x (M, K) float32. Returns (M, N)
// float32:
//
//     y[m, n] = sum_g scales[n, g] * sum_{k in block g} lut[code[n, k]] * x[m, k]
//
// The AVX2 path decodes 8 codes (4 bytes) at a time: the nibbles become eight 32-bit lanes,
// two 8-entry permutes look both halves of the table up, bit 3 picks one (a blend on the
// lane's sign after a shift). It needs even block starts (an even block size); odd ones take
// the portable loop.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FP4_AVX2 1
#endif

namespace {

constexpr int kMaxRows = 8;

void row_portable(const float* x, int64_t m_rows, int64_t k_cols, const uint8_t* q,
                  const float* s, const float* lut, int64_t block, float* out) {
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* xm = x + m * k_cols;
    float total = 0.f;
    for (int64_t start = 0, g = 0; start < k_cols; start += block, ++g) {
      const int64_t stop = std::min(start + block, k_cols);
      float part = 0.f;
      for (int64_t k = start; k < stop; ++k) {
        const uint8_t byte = q[k >> 1];
        part += lut[(k & 1) ? (byte >> 4) : (byte & 0x0F)] * xm[k];
      }
      total += part * s[g];
    }
    out[m] = total;
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
  auto decode = [&](const uint8_t* bytes) {
    uint32_t word;
    std::memcpy(&word, bytes, 4);
    const __m256i idx = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), nibble);
    const __m256 low = _mm256_permutevar8x32_ps(lut_lo, idx);
    const __m256 high = _mm256_permutevar8x32_ps(lut_hi, idx);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  };
  __m256 total[M];
  float tail[M];
  for (int m = 0; m < M; ++m) {
    total[m] = _mm256_setzero_ps();
    tail[m] = 0.f;
  }
  for (int64_t start = 0, g = 0; start < k_cols; start += block, ++g) {
    const int64_t stop = std::min(start + block, k_cols);
    __m256 even[M], odd[M];
    for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm256_setzero_ps();
    int64_t k = start;
    for (; k + 16 <= stop; k += 16) {
      const __m256 w0 = decode(q + (k >> 1));
      const __m256 w1 = decode(q + (k >> 1) + 4);
      for (int m = 0; m < M; ++m) {
        even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * k_cols + k), even[m]);
        odd[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * k_cols + k + 8), odd[m]);
      }
    }
    for (; k + 8 <= stop; k += 8) {
      const __m256 w0 = decode(q + (k >> 1));
      for (int m = 0; m < M; ++m)
        even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * k_cols + k), even[m]);
    }
    const __m256 scale = _mm256_set1_ps(s[g]);
    for (int m = 0; m < M; ++m)
      total[m] = _mm256_fmadd_ps(_mm256_add_ps(even[m], odd[m]), scale, total[m]);
    for (; k < stop; ++k) {  // a partial block's last codes
      const uint8_t byte = q[k >> 1];
      const float w = lut[(k & 1) ? (byte >> 4) : (byte & 0x0F)] * s[g];
      for (int m = 0; m < M; ++m) tail[m] += w * x[m * k_cols + k];
    }
  }
  for (int m = 0; m < M; ++m) out[m] = hsum(total[m]) + tail[m];
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

}  // namespace

bool vectorized() {
#ifdef FP4_AVX2
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
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> decoded(coded ? groups : 0);
    for (int64_t n = begin; n < end; ++n) {
      const float* row_scales = coded ? nullptr : sp + n * groups;
      if (coded) {
        for (int64_t g = 0; g < groups; ++g) decoded[g] = dp[cp[n * groups + g]];
        row_scales = decoded.data();
      }
#ifdef FP4_AVX2
      if (block % 2 == 0) {
        rows_avx2<kMaxRows>(xp, m_rows, k_cols, qp + n * row_bytes, row_scales, lp, block,
                            op + n * m_rows);
        continue;
      }
#endif
      row_portable(xp, m_rows, k_cols, qp + n * row_bytes, row_scales, lp, block,
                   op + n * m_rows);
    }
  });
  return result.t().contiguous();  // (N, M) -> (M, N)
}
