// Fused GEMV over FP8 codes (E4M3 or E5M2) with block scales: codes decoded in registers, never
// a dense weight.
//
// qweight (N, K) uint8, the FP8 bit patterns; scales (ceil(N/bn), ceil(K/bk)) float32, or uint8
// E8M0 exponents (MXFP8, scale 2**(e - 127)); x (R, K) float32. Returns (R, N) float32:
//
//     y[r, n] = sum_k round(fp8(code[n, k]) * scale[n / bn, k / bk]) * x[r, k]
//
// where round is to the activation dtype (``round_to``: 0 none, 1 bf16, 2 fp16, to nearest even),
// so each product uses exactly the weight the reference kernel and the in-memory model use (the
// fp32 product cast to their dtype); products and sums are fp32.
//
// Decode: an FP8 byte is turned into the fp16 with the same sign, exponent bits and mantissa
// (E5M2 is the top byte of an fp16 as it is; E4M3's 4-bit exponent and 3-bit mantissa shift into
// fp16's fields with a bias 8 lower, made up by a factor 2**8 folded into the scale), then the
// hardware fp16 -> fp32 conversion (F16C / AVX-512) gives the exact value, subnormals included.
// AVX-512 takes 16 codes a step, AVX2 8; scale blocks narrower than a step, and tails, take the
// portable loop (the same arithmetic, one code at a time).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FP8_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FP8_AVX2 1
#endif

namespace {

constexpr int kMaxRows = 8;

// fp16 bit pattern of an FP8 byte (see the header): E4M3 needs a further factor 2**8.
inline uint16_t fp8_to_half_bits(uint8_t code, bool e4m3) {
  if (!e4m3) return static_cast<uint16_t>(code) << 8;
  return static_cast<uint16_t>(((code & 0x80) << 8) | ((code & 0x7F) << 7));
}

inline float round_scalar(float w, int round_to) {
  if (round_to == 1) return static_cast<float>(c10::BFloat16(w));
  if (round_to == 2) return static_cast<float>(c10::Half(w));
  return w;
}

struct Shape {
  int64_t k_cols, block_n, block_k, scale_cols;
  bool e4m3, e8m0;
  int round_to;
};

inline float scale_of(const Shape& sh, const float* sf, const uint8_t* s8, int64_t row,
                      int64_t kb) {
  const int64_t index = (row / sh.block_n) * sh.scale_cols + kb;
  const float unit = sh.e4m3 ? 256.0f : 1.0f;  // E4M3 decoded through fp16 is 2**-8 too small
  if (sh.e8m0) return unit * std::ldexp(1.0f, static_cast<int>(s8[index]) - 127);
  return unit * sf[index];
}

void span_portable(const Shape& sh, const float* x, int64_t rows, const uint8_t* q, float scale,
                   int64_t from, int64_t to, float* acc) {
  for (int64_t k = from; k < to; ++k) {
    const float w =
        round_scalar(static_cast<float>(c10::Half(fp8_to_half_bits(q[k], sh.e4m3),
                                                  c10::Half::from_bits())) * scale,
                     sh.round_to);
    for (int64_t r = 0; r < rows; ++r) acc[r] += w * x[r * sh.k_cols + k];
  }
}

#ifdef FP8_AVX512
constexpr int64_t kStep = 16;

inline __m512 decode16(const uint8_t* q, bool e4m3) {
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  __m256i half;
  if (e4m3) {
    half = _mm256_or_si256(
        _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8),
        _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7F)), 7));
  } else {
    half = _mm256_slli_epi16(v, 8);
  }
  return _mm512_cvtph_ps(half);
}

inline __m512 round_vec(__m512 w, int round_to) {
  if (round_to == 1) {  // to bf16, nearest even, in the integer unit
    const __m512i bits = _mm512_castps_si512(w);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i sum = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(sum, _mm512_set1_epi32(-65536)));
  }
  if (round_to == 2) return _mm512_cvtph_ps(_mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT));
  return w;
}

template <int kRows>
void span_vector(const Shape& sh, const float* x, const uint8_t* q, float scale, int64_t from,
                 int64_t to, __m512* acc) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t k = from; k < to; k += kStep) {
    const __m512 w = round_vec(_mm512_mul_ps(decode16(q + k, sh.e4m3), s), sh.round_to);
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * sh.k_cols + k), acc[r]);
    }
  }
}

template <int kRows>
void row_vector(const Shape& sh, const float* x, const uint8_t* q, const float* sf,
                const uint8_t* s8, int64_t row, float* out) {
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  float tail[kMaxRows] = {0.f};
  for (int64_t kb = 0, start = 0; start < sh.k_cols; ++kb, start += sh.block_k) {
    const int64_t stop = std::min(sh.k_cols, start + sh.block_k);
    const float scale = scale_of(sh, sf, s8, row, kb);
    const int64_t vec_stop = start + (stop - start) / kStep * kStep;
    span_vector<kRows>(sh, x, q, scale, start, vec_stop, acc);
    span_portable(sh, x, kRows, q, scale, vec_stop, stop, tail);
  }
  for (int r = 0; r < kRows; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + tail[r];
}
#elif defined(FP8_AVX2)
constexpr int64_t kStep = 8;

inline __m256 decode8(const uint8_t* q, bool e4m3) {
  const __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  __m128i half;
  if (e4m3) {
    half = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(v, _mm_set1_epi16(0x80)), 8),
                        _mm_slli_epi16(_mm_and_si128(v, _mm_set1_epi16(0x7F)), 7));
  } else {
    half = _mm_slli_epi16(v, 8);
  }
  return _mm256_cvtph_ps(half);
}

inline __m256 round_vec(__m256 w, int round_to) {
  if (round_to == 1) {
    const __m256i bits = _mm256_castps_si256(w);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i sum = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    return _mm256_castsi256_ps(_mm256_and_si256(sum, _mm256_set1_epi32(-65536)));
  }
  if (round_to == 2) return _mm256_cvtph_ps(_mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT));
  return w;
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  lo = _mm_add_ps(lo, _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}

template <int kRows>
void row_vector(const Shape& sh, const float* x, const uint8_t* q, const float* sf,
                const uint8_t* s8, int64_t row, float* out) {
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  float tail[kMaxRows] = {0.f};
  for (int64_t kb = 0, start = 0; start < sh.k_cols; ++kb, start += sh.block_k) {
    const int64_t stop = std::min(sh.k_cols, start + sh.block_k);
    const float scale = scale_of(sh, sf, s8, row, kb);
    const __m256 s = _mm256_set1_ps(scale);
    const int64_t vec_stop = start + (stop - start) / kStep * kStep;
    for (int64_t k = start; k < vec_stop; k += kStep) {
      const __m256 w = round_vec(_mm256_mul_ps(decode8(q + k, sh.e4m3), s), sh.round_to);
      for (int r = 0; r < kRows; ++r) {
        acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * sh.k_cols + k), acc[r]);
      }
    }
    span_portable(sh, x, kRows, q, scale, vec_stop, stop, tail);
  }
  for (int r = 0; r < kRows; ++r) out[r] = hsum(acc[r]) + tail[r];
}
#endif

#if defined(FP8_AVX512) || defined(FP8_AVX2)
void row_dispatch(const Shape& sh, const float* x, int64_t rows, const uint8_t* q,
                  const float* sf, const uint8_t* s8, int64_t row, float* out) {
  switch (rows) {
    case 1: return row_vector<1>(sh, x, q, sf, s8, row, out);
    case 2: return row_vector<2>(sh, x, q, sf, s8, row, out);
    case 3: return row_vector<3>(sh, x, q, sf, s8, row, out);
    case 4: return row_vector<4>(sh, x, q, sf, s8, row, out);
    case 5: return row_vector<5>(sh, x, q, sf, s8, row, out);
    case 6: return row_vector<6>(sh, x, q, sf, s8, row, out);
    case 7: return row_vector<7>(sh, x, q, sf, s8, row, out);
    default: return row_vector<8>(sh, x, q, sf, s8, row, out);
  }
}
#endif

void row_portable(const Shape& sh, const float* x, int64_t rows, const uint8_t* q,
                  const float* sf, const uint8_t* s8, int64_t row, float* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = 0.f;
  for (int64_t kb = 0, start = 0; start < sh.k_cols; ++kb, start += sh.block_k) {
    const int64_t stop = std::min(sh.k_cols, start + sh.block_k);
    span_portable(sh, x, rows, q, scale_of(sh, sf, s8, row, kb), start, stop, out);
  }
}

}  // namespace

bool vectorized() {
#if defined(FP8_AVX512) || defined(FP8_AVX2)
  return true;
#else
  return false;
#endif
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, bool e4m3,
                   int64_t block_n, int64_t block_k, int64_t round_to) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous (R, K) float32 tensor");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most ", kMaxRows, " activation rows a call");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous() &&
                  qweight.size(1) == x.size(1),
              "qweight must be a contiguous (N, K) uint8 tensor");
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 2 &&
                  (scales.scalar_type() == torch::kFloat32 ||
                   scales.scalar_type() == torch::kUInt8),
              "scales must be a contiguous 2-D float32 or uint8 (E8M0) tensor");
  Shape sh;
  sh.k_cols = x.size(1);
  sh.block_n = block_n;
  sh.block_k = block_k;
  sh.scale_cols = scales.size(1);
  sh.e4m3 = e4m3;
  sh.e8m0 = scales.scalar_type() == torch::kUInt8;
  sh.round_to = static_cast<int>(round_to);
  TORCH_CHECK(scales.size(0) == (qweight.size(0) + block_n - 1) / block_n &&
                  sh.scale_cols == (sh.k_cols + block_k - 1) / block_k,
              "scales do not match the weight and the block shape");
  const int64_t rows = x.size(0), out_features = qweight.size(0);
  auto out = torch::empty({rows, out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float* sf = sh.e8m0 ? nullptr : scales.data_ptr<float>();
  const uint8_t* s8 = sh.e8m0 ? scales.data_ptr<uint8_t>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    float acc[kMaxRows];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* q = qp + n * sh.k_cols;
#if defined(FP8_AVX512) || defined(FP8_AVX2)
      row_dispatch(sh, xp, rows, q, sf, s8, n, acc);
#else
      row_portable(sh, xp, rows, q, sf, s8, n, acc);
#endif
      for (int64_t r = 0; r < rows; ++r) op[r * out_features + n] = acc[r];
    }
  });
  return out;
}
