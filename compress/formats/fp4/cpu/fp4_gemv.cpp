// Fused GEMV over packed 4-bit table codes: decode in registers, never a dense weight.
//
// qweight (N, ceil(K/2)) uint8, two codes a byte, low nibble first (column 2j in the low
// nibble of byte j); scales (N, G) as the format stores them: float32 multipliers (NF4, FP4),
// or uint8 codes (E8M0, E4M3) that scale_lut (256,) float32 decodes (NVFP4's tensor scale
// folded in by the caller); lut (16,) float32, code -> value; x (M, K) float32. Returns (M, N)
// float32:
//
//     y[m, n] = sum_k round(lut[code[n, k]] * scale[n, k / block]) * x[m, k]
//
// where round is to the activation dtype (``round_to``: 0 none, 1 bf16, 2 fp16, to nearest
// even): the weight each product uses is exactly the dequantized weight the reference kernel
// and the in-memory model use (the fp32 product cast to their dtype); products and sums stay
// in fp32, so only the order of the additions differs from torch's GEMM.
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

// The fp32 value of w rounded to bf16 / fp16 (nearest even); finite inputs only.
inline float round_scalar(float w, int round_to) {
  if (round_to == 1) return static_cast<float>(c10::BFloat16(w));
  if (round_to == 2) return static_cast<float>(c10::Half(w));
  return w;
}

void row_portable(const float* x, int64_t m_rows, int64_t k_cols, const uint8_t* q,
                  const float* s, const float* lut, int64_t block, int round_to, float* out) {
  for (int64_t m = 0; m < m_rows; ++m) out[m] = 0.f;
  for (int64_t k = 0; k < k_cols; ++k) {
    const uint8_t byte = q[k >> 1];
    const float w = round_scalar(lut[(k & 1) ? (byte >> 4) : (byte & 0x0F)] * s[k / block],
                                 round_to);
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

template <int Round>
inline __m256 round_vector(__m256 w) {
  if constexpr (Round == 1) {  // bf16, nearest even: bits + 0x7FFF + lsb, low half cleared
    const __m256i bits = _mm256_castps_si256(w);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i up = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
    return _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(-65536)));
  } else if constexpr (Round == 2) {  // fp16 through F16C (nearest even)
    return _mm256_cvtph_ps(_mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT));
  } else {
    return w;
  }
}

// M activation rows as a template parameter: the accumulators stay in registers. Two
// independent accumulators per row (16 codes a step) hide the FMA latency.
template <int M, int Round>
void row_avx2(const float* x, int64_t k_cols, const uint8_t* q, const float* s,
              const float* lut, int64_t block, float* out) {
  const __m256 lut_lo = _mm256_loadu_ps(lut);
  const __m256 lut_hi = _mm256_loadu_ps(lut + 8);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  // 8 codes (4 bytes) -> their weights: table value times the block scale, then rounded
  auto decode = [&](const uint8_t* bytes, __m256 scale) {
    uint32_t word;
    std::memcpy(&word, bytes, 4);
    const __m256i idx = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), nibble);
    const __m256 low = _mm256_permutevar8x32_ps(lut_lo, idx);
    const __m256 high = _mm256_permutevar8x32_ps(lut_hi, idx);
    const __m256 value =
        _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    return round_vector<Round>(_mm256_mul_ps(value, scale));
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
      const float w = round_scalar(lut[(k & 1) ? (byte >> 4) : (byte & 0x0F)] * s[g], Round);
      for (int m = 0; m < M; ++m) tail[m] += w * x[m * k_cols + k];
    }
  }
  for (int m = 0; m < M; ++m) out[m] = hsum(_mm256_add_ps(even[m], odd[m])) + tail[m];
}

template <int M, int Round>
void rows_avx2(const float* x, int64_t m_rows, int64_t k_cols, const uint8_t* q,
               const float* s, const float* lut, int64_t block, float* out) {
  if constexpr (M > 1) {
    if (m_rows < M) return rows_avx2<M - 1, Round>(x, m_rows, k_cols, q, s, lut, block, out);
  }
  row_avx2<M, Round>(x, k_cols, q, s, lut, block, out);
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
                   torch::Tensor scale_lut, torch::Tensor lut, int64_t block, int64_t round_to) {
  TORCH_CHECK(round_to >= 0 && round_to <= 2, "round_to: 0 none, 1 bf16, 2 fp16");
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
        const uint8_t* qn = qp + n * row_bytes;
        float* on = op + n * m_rows;
        if (round_to == 1)
          rows_avx2<kMaxRows, 1>(xp, m_rows, k_cols, qn, row_scales, lp, block, on);
        else if (round_to == 2)
          rows_avx2<kMaxRows, 2>(xp, m_rows, k_cols, qn, row_scales, lp, block, on);
        else
          rows_avx2<kMaxRows, 0>(xp, m_rows, k_cols, qn, row_scales, lp, block, on);
        continue;
      }
#endif
      row_portable(xp, m_rows, k_cols, qp + n * row_bytes, row_scales, lp, block, round_to,
                   op + n * m_rows);
    }
  });
  return result.t().contiguous();  // (N, M) -> (M, N)
}
