// Fused GEMV over packed MXFP6 codes: decode in registers, never a dense weight.
//
// qweight (N, ceil(6K/8)) uint8, each row a little-endian bit stream (code k in bits
// [6k, 6k+6): four codes in three bytes); scales (N, G) uint8 E8M0 exponents, decoded by
// scale_lut (256,) float32; lut (64,) float32, code -> element value, sign-magnitude
// (lut[c | 32] == -lut[c], checked by the caller); x (M, K) float32. Returns (M, N) float32:
//
//     y[m, n] = sum_k lut[code[n, k]] * scale[n, k / block] * x[m, k]
//
// in fp32. The reference kernel rounds each weight to the activation dtype first; these paths do
// not (more exact, and fewer operations a weight), so in bf16 the two differ by that rounding and
// the order of the sums, like the other formats' kernels.
//
// The AVX2 path decodes 8 codes (6 bytes) at a time, 16 (two 8-byte loads of 12 bytes) a step:
// the two 24-bit words of four codes each go to lanes 0-3 and 4-7, a variable shift leaves one
// code a lane; four 8-entry permutes look the
// 32 magnitudes up, bits 3 and 4 pick one (blends on the lane's sign after a shift) and bit 5
// flips the sign. Blocks must start on whole bytes of 8 codes (a block size that is a multiple of
// 8; MX blocks are 32); a partial block's last codes take the scalar loop.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FP6_AVX2 1
#endif

namespace {

constexpr int kMaxRows = 8;

// Code k of a row of row_bytes bytes (it may straddle two bytes).
inline int code_at(const uint8_t* q, int64_t k, int64_t row_bytes) {
  const int64_t bit = 6 * k, byte = bit >> 3;
  unsigned v = q[byte];
  if (byte + 1 < row_bytes) v |= static_cast<unsigned>(q[byte + 1]) << 8;
  return static_cast<int>((v >> (bit & 7)) & 0x3F);
}

void row_portable(const float* x, int64_t m_rows, int64_t k_cols, const uint8_t* q,
                  int64_t row_bytes, const float* s, const float* lut, int64_t block,
                  float* out) {
  for (int64_t m = 0; m < m_rows; ++m) out[m] = 0.f;
  for (int64_t start = 0, g = 0; start < k_cols; start += block, ++g) {
    const int64_t stop = std::min(start + block, k_cols);
    for (int64_t k = start; k < stop; ++k) {
      const float w = lut[code_at(q, k, row_bytes)] * s[g];
      for (int64_t m = 0; m < m_rows; ++m) out[m] += w * x[m * k_cols + k];
    }
  }
}

#ifdef FP6_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Bytes as a little-endian integer, from one unaligned load (x86 is little-endian). A 3-byte
// memcpy would go through the stack, and the store-forwarding stall of reading it back cost 4x.
inline uint64_t load8(const uint8_t* bytes) {
  uint64_t word;
  std::memcpy(&word, bytes, 8);
  return word;
}

inline uint32_t load3(const uint8_t* bytes) {
  return static_cast<uint32_t>(bytes[0]) | (static_cast<uint32_t>(bytes[1]) << 8) |
         (static_cast<uint32_t>(bytes[2]) << 16);
}

// M activation rows as a template parameter: the accumulators stay in registers. Two
// independent accumulators per row (16 codes a step) hide the FMA latency.
template <int M>
void row_avx2(const float* x, int64_t k_cols, const uint8_t* q, int64_t row_bytes,
              const float* s, const float* lut, int64_t block, float* out) {
  const __m256 t0 = _mm256_loadu_ps(lut);
  const __m256 t1 = _mm256_loadu_ps(lut + 8);
  const __m256 t2 = _mm256_loadu_ps(lut + 16);
  const __m256 t3 = _mm256_loadu_ps(lut + 24);
  const __m256i shifts = _mm256_setr_epi32(0, 6, 12, 18, 0, 6, 12, 18);
  const __m256i six = _mm256_set1_epi32(0x3F);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  // 8 codes (48 bits: codes 0-3 in lo's low 24 bits, 4-7 in hi's) -> their weights: table
  // value times the block scale
  auto decode = [&](uint32_t lo_word, uint32_t hi_word, __m256 scale) {
    const int lo = static_cast<int>(lo_word), hi = static_cast<int>(hi_word);
    const __m256i words = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(words, shifts), six);
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    const __m256 low = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx),
                                        _mm256_permutevar8x32_ps(t1, idx), bit3);
    const __m256 high = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t2, idx),
                                         _mm256_permutevar8x32_ps(t3, idx), bit3);
    const __m256 magnitude =
        _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27)));
    const __m256 flip = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(idx, 26), sign));
    return _mm256_mul_ps(_mm256_xor_ps(magnitude, flip), scale);
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
      // 12 bytes: codes 0-7 in bits 0-47 of the first 8, codes 8-15 in bits 16-63 of the last 8
      const uint8_t* bytes = q + (k / 8) * 6;
      const uint64_t first = load8(bytes), last = load8(bytes + 4);
      const __m256 w0 = decode(static_cast<uint32_t>(first), static_cast<uint32_t>(first >> 24),
                               scale);
      const __m256 w1 = decode(static_cast<uint32_t>(last >> 16),
                               static_cast<uint32_t>(last >> 40), scale);
      for (int m = 0; m < M; ++m) {
        even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * k_cols + k), even[m]);
        odd[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * k_cols + k + 8), odd[m]);
      }
    }
    for (; k + 8 <= stop; k += 8) {
      const uint8_t* bytes = q + (k / 8) * 6;  // 6 bytes: no 8-byte load past the row's end
      const __m256 w0 = decode(load3(bytes), load3(bytes + 3), scale);
      for (int m = 0; m < M; ++m)
        even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * k_cols + k), even[m]);
    }
    for (; k < stop; ++k) {  // a partial block's last codes
      const float w = lut[code_at(q, k, row_bytes)] * s[g];
      for (int m = 0; m < M; ++m) tail[m] += w * x[m * k_cols + k];
    }
  }
  for (int m = 0; m < M; ++m) out[m] = hsum(_mm256_add_ps(even[m], odd[m])) + tail[m];
}

template <int M>
void rows_avx2(const float* x, int64_t m_rows, int64_t k_cols, const uint8_t* q,
               int64_t row_bytes, const float* s, const float* lut, int64_t block, float* out) {
  if constexpr (M > 1) {
    if (m_rows < M) return rows_avx2<M - 1>(x, m_rows, k_cols, q, row_bytes, s, lut, block, out);
  }
  row_avx2<M>(x, k_cols, q, row_bytes, s, lut, block, out);
}
#endif

}  // namespace

bool vectorized() {
#ifdef FP6_AVX2
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
  TORCH_CHECK(scales.scalar_type() == torch::kUInt8 && scales.is_contiguous(),
              "scales must be contiguous uint8 E8M0 exponents");
  TORCH_CHECK(scale_lut.scalar_type() == torch::kFloat32 && scale_lut.numel() == 256,
              "scale_lut must hold 256 float32 values");
  TORCH_CHECK(lut.scalar_type() == torch::kFloat32 && lut.numel() == 64, "lut");
  const int64_t m_rows = x.size(0), k_cols = x.size(1), n_rows = qweight.size(0);
  const int64_t row_bytes = qweight.size(1), groups = scales.size(1);
  TORCH_CHECK(row_bytes == (6 * k_cols + 7) / 8, "qweight has ", row_bytes,
              " bytes a row for K=", k_cols);
  TORCH_CHECK(block > 0 && groups == (k_cols + block - 1) / block && scales.size(0) == n_rows,
              "scales do not match");
  auto result = torch::empty({n_rows, m_rows}, x.options());
  if (m_rows == 0 || n_rows == 0) return result.t().contiguous();
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const uint8_t* cp = scales.data_ptr<uint8_t>();
  const float* dp = scale_lut.data_ptr<float>();
  const float* lp = lut.data_ptr<float>();
  float* op = result.data_ptr<float>();
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> decoded(groups);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < groups; ++g) decoded[g] = dp[cp[n * groups + g]];
      const uint8_t* qn = qp + n * row_bytes;
      float* on = op + n * m_rows;
#ifdef FP6_AVX2
      if (block % 8 == 0) {
        rows_avx2<kMaxRows>(xp, m_rows, k_cols, qn, row_bytes, decoded.data(), lp, block, on);
        continue;
      }
#endif
      row_portable(xp, m_rows, k_cols, qn, row_bytes, decoded.data(), lp, block, on);
    }
  });
  return result.t().contiguous();  // (N, M) -> (M, N)
}
