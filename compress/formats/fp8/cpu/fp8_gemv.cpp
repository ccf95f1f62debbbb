// Fused GEMV over FP8 codes (E4M3 or E5M2) with block scales: codes decoded in registers, never
// a dense weight.
//
// qweight (N, K) uint8, the FP8 bit patterns; scales (ceil(N/bn), ceil(K/bk)) float32, or uint8
// E8M0 exponents (MXFP8, scale 2**(e - 127)); x (R, K) float32. Returns (R, N) float32:
//
//     y[r, n] = sum over scale blocks b of scale[b] * sum_{k in b} fp8(code[n, k]) * x[r, k]
//
// in fp32: the FP8 values are exact in fp32, the scale is applied once per block and row (not
// per weight). The reference kernel rounds each weight to the activation dtype first; this one
// does not (more exact, and four fewer operations per 16 weights), so in bf16 the two differ by
// that rounding and the order of the sums, like the integer format's kernels.
//
// Decode: an FP8 byte is turned into the fp16 with the same sign, exponent bits and mantissa
// (E5M2 is the top byte of an fp16 as it is; E4M3, sign-extended to 16 bits and shifted left 7,
// has its sign at bit 15, its 4-bit exponent and 3-bit mantissa in fp16's fields with a bias 8
// lower (made up by a factor 2**8 folded into the scale), and bit 14 cleared by a mask), then the
// hardware fp16 -> fp32 conversion (F16C / AVX-512) gives the exact value, subnormals included.
// AVX-512 takes 16 codes a step, AVX2 8; tails of a block take the portable loop (the same
// arithmetic, one code at a time).

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

struct Shape {
  int64_t k_cols, block_n, block_k, scale_cols;
  bool e4m3, e8m0;
};

// Scale of block kb of the row whose scale row starts at `base` (computed once a row: a division
// per block costs as much as the block's arithmetic for MX's 32-wide blocks).
inline float scale_of(const Shape& sh, const float* sf, const uint8_t* s8, int64_t base,
                      int64_t kb) {
  const int64_t index = base + kb;
  const float unit = sh.e4m3 ? 256.0f : 1.0f;  // E4M3 decoded through fp16 is 2**-8 too small
  if (sh.e8m0) {  // 2**(e - 127) built from its bits (ldexp is a library call: too slow here)
    const uint8_t e = s8[index];
    const uint32_t bits = e == 0 ? 0x00400000u : static_cast<uint32_t>(e) << 23;
    float value;
    std::memcpy(&value, &bits, 4);
    return unit * value;
  }
  return unit * sf[index];
}

// sum_k fp8(q[k]) * x[r, k] over [from, to), added to acc[r] (the block's scale not applied).
void span_portable(const Shape& sh, const float* x, int64_t rows, const uint8_t* q, int64_t from,
                   int64_t to, float* acc) {
  for (int64_t k = from; k < to; ++k) {
    const float w =
        static_cast<float>(c10::Half(fp8_to_half_bits(q[k], sh.e4m3), c10::Half::from_bits()));
    for (int64_t r = 0; r < rows; ++r) acc[r] += w * x[r * sh.k_cols + k];
  }
}

#if defined(FP8_AVX512)
// The few vector operations the row loop needs, for each instruction set.
using Vec = __m512;
constexpr int64_t kStep = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float v) { return _mm512_set1_ps(v); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vscalar(float v) { return _mm512_castps128_ps512(_mm_set_ss(v)); }  // lane 0 only
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }

inline Vec decode(const uint8_t* q, bool e4m3) {  // 16 codes
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  if (!e4m3) return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes), 8));
  const __m256i shifted = _mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7);
  return _mm512_cvtph_ps(_mm256_and_si256(shifted, _mm256_set1_epi16(-16385)));  // ~bit 14
}
#elif defined(FP8_AVX2)
using Vec = __m256;
constexpr int64_t kStep = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float v) { return _mm256_set1_ps(v); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vscalar(float v) { return _mm256_castps128_ps256(_mm_set_ss(v)); }
inline float vsum(Vec v) {
  __m128 lo = _mm256_castps256_ps128(v);
  lo = _mm_add_ps(lo, _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}

inline Vec decode(const uint8_t* q, bool e4m3) {  // 8 codes
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  if (!e4m3) return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(bytes), 8));
  const __m128i shifted = _mm_slli_epi16(_mm_cvtepi8_epi16(bytes), 7);
  return _mm256_cvtph_ps(_mm_and_si128(shifted, _mm_set1_epi16(-16385)));
}
#endif

#if defined(FP8_AVX512) || defined(FP8_AVX2)
// Narrow blocks (MX's 32, or any even number of steps up to 4 dividing K): each step's weights
// take their block's scale before the FMA, so no per-block sums to close. Two accumulators a row
// take alternate steps: one chain of dependent FMAs would wait on its latency.
template <int kRows>
void row_narrow(const Shape& sh, const float* x, const uint8_t* q, const float* sf,
                const uint8_t* s8, int64_t row, float* out) {
  Vec acc[kRows], other[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = other[r] = vzero();
  const int64_t base = (row / sh.block_n) * sh.scale_cols;
  for (int64_t kb = 0, start = 0; start < sh.k_cols; ++kb, start += sh.block_k) {
    const Vec scale = vset(scale_of(sh, sf, s8, base, kb));
    for (int64_t k = start; k < start + sh.block_k; k += 2 * kStep) {
      const Vec w0 = vmul(decode(q + k, sh.e4m3), scale);
      const Vec w1 = vmul(decode(q + k + kStep, sh.e4m3), scale);
      for (int r = 0; r < kRows; ++r) {
        const float* xr = x + r * sh.k_cols + k;
        acc[r] = vfma(w0, vload(xr), acc[r]);
        other[r] = vfma(w1, vload(xr + kStep), other[r]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) out[r] = vsum(vadd(acc[r], other[r]));
}

// Wide blocks (a row, a tensor, 2-D blocks of 64 or 128): each block's sum is scaled once.
template <int kRows>
void row_wide(const Shape& sh, const float* x, const uint8_t* q, const float* sf,
              const uint8_t* s8, int64_t row, float* out) {
  Vec acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = vzero();
  float tail[kMaxRows];
  const int64_t base = (row / sh.block_n) * sh.scale_cols;
  for (int64_t kb = 0, start = 0; start < sh.k_cols; ++kb, start += sh.block_k) {
    const int64_t stop = std::min(sh.k_cols, start + sh.block_k);
    const int64_t vec_stop = start + (stop - start) / kStep * kStep;
    Vec block[kRows], other[kRows];  // two accumulators, as in row_narrow
    for (int r = 0; r < kRows; ++r) block[r] = other[r] = vzero();
    int64_t k = start;
    for (; k + 2 * kStep <= vec_stop; k += 2 * kStep) {
      const Vec w0 = decode(q + k, sh.e4m3);
      const Vec w1 = decode(q + k + kStep, sh.e4m3);
      for (int r = 0; r < kRows; ++r) {
        const float* xr = x + r * sh.k_cols + k;
        block[r] = vfma(w0, vload(xr), block[r]);
        other[r] = vfma(w1, vload(xr + kStep), other[r]);
      }
    }
    if (k < vec_stop) {
      const Vec w = decode(q + k, sh.e4m3);
      for (int r = 0; r < kRows; ++r) block[r] = vfma(w, vload(x + r * sh.k_cols + k), block[r]);
    }
    for (int r = 0; r < kRows; ++r) tail[r] = 0.f;
    span_portable(sh, x, kRows, q, vec_stop, stop, tail);
    const Vec scale = vset(scale_of(sh, sf, s8, base, kb));
    for (int r = 0; r < kRows; ++r) {  // the block's tail joins lane 0, the block takes its scale
      acc[r] = vfma(vadd(vadd(block[r], other[r]), vscalar(tail[r])), scale, acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) out[r] = vsum(acc[r]);
}

template <int kRows>
void row_vector(const Shape& sh, const float* x, const uint8_t* q, const float* sf,
                const uint8_t* s8, int64_t row, float* out) {
  const bool narrow =
      sh.block_k % (2 * kStep) == 0 && sh.block_k <= 4 * kStep && sh.k_cols % sh.block_k == 0;
  if (narrow) return row_narrow<kRows>(sh, x, q, sf, s8, row, out);
  return row_wide<kRows>(sh, x, q, sf, s8, row, out);
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
  float block[kMaxRows];
  for (int64_t r = 0; r < rows; ++r) out[r] = 0.f;
  const int64_t base = (row / sh.block_n) * sh.scale_cols;
  for (int64_t kb = 0, start = 0; start < sh.k_cols; ++kb, start += sh.block_k) {
    const int64_t stop = std::min(sh.k_cols, start + sh.block_k);
    for (int64_t r = 0; r < rows; ++r) block[r] = 0.f;
    span_portable(sh, x, rows, q, start, stop, block);
    const float scale = scale_of(sh, sf, s8, base, kb);
    for (int64_t r = 0; r < rows; ++r) out[r] += block[r] * scale;
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
                   int64_t block_n, int64_t block_k) {
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
