// Fused GEMV over N:M sparse integer codes: only the kept codes are read, each times the
// activation at its column; never a dense weight.
//
// qweight (N, ceil(KEPT*bits/8)) uint8, the kept codes of each row as a little-endian bit
// stream; qindex (N, ceil(KEPT*ib/8)) uint8, each kept code's position in its run of m, ib bits
// the same way; scales (N, G) float16 / bfloat16 / float32, or uint8 E8M0 exponents
// (scale_kind 3); zeros (N, G) uint8 or empty (symmetric: the zero point is 2**(bits-1));
// x (R, K) float32. Kept code j of a row sits at column (j / n) * m + index[j]. Returns (R, N)
// float32:
//
//     y[r, o] = sum_j (code[o, j] - zero[o, g]) * scale[o, g] * x[r, col(o, j)],  g = col / group
//
// The weight is formed in fp32 (exact for codes of up to 8 bits and these scales); products and
// sums are fp32, so only the order of the additions differs from the reference kernel.
//
// The vector paths (AVX-512: 16 kept codes a step, AVX2: 8) take 2-bit positions (m <= 4), runs
// whose steps span exactly two vectors of columns, 2-, 4- or 8-bit codes
// (m = 2n: 2:4, 1:2) and scale groups holding a multiple of 16 (8) kept codes. A step's positions are one 32-bit
// (16-bit) word, split into lanes by per-lane shifts; the activations they multiply are picked
// out of the step's columns, loaded as two vectors, by a two-source permute (AVX2: two permutes
// and a blend), not a gather: gathers are slow where the Downfall mitigation is on. Other
// shapes take the portable loop.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define NM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NM_AVX2 1
#endif

namespace {

constexpr int kMaxRows = 8;

struct Shape {
  int64_t k_cols, kept, group, n, m;
  int bits, index_bits;
  int64_t q_stride, i_stride;
};

// Bits [pos, pos + width) of a little-endian bit stream of `size` bytes (width <= 8).
inline uint32_t read_bits(const uint8_t* data, int64_t size, int64_t pos, int width) {
  const int64_t byte = pos >> 3;
  uint32_t word = data[byte];
  if (byte + 1 < size) word |= static_cast<uint32_t>(data[byte + 1]) << 8;
  return (word >> (pos & 7)) & ((1u << width) - 1u);
}

// The row's scales and zero points as fp32 (one entry per group).
void row_params(const torch::Tensor& scales, const torch::Tensor& zeros, int64_t row, int bits,
                std::vector<float>& s, std::vector<float>& z) {
  const int64_t groups = scales.size(1);
  s.resize(groups);
  z.resize(groups);
  switch (scales.scalar_type()) {
    case torch::kFloat32: {
      const float* p = scales.data_ptr<float>() + row * groups;
      for (int64_t g = 0; g < groups; ++g) s[g] = p[g];
      break;
    }
    case torch::kFloat16: {
      const c10::Half* p = scales.data_ptr<c10::Half>() + row * groups;
      for (int64_t g = 0; g < groups; ++g) s[g] = static_cast<float>(p[g]);
      break;
    }
    case torch::kBFloat16: {
      const c10::BFloat16* p = scales.data_ptr<c10::BFloat16>() + row * groups;
      for (int64_t g = 0; g < groups; ++g) s[g] = static_cast<float>(p[g]);
      break;
    }
    default: {  // uint8 E8M0: 2**(e - 127)
      const uint8_t* p = scales.data_ptr<uint8_t>() + row * groups;
      for (int64_t g = 0; g < groups; ++g) s[g] = std::ldexp(1.0f, static_cast<int>(p[g]) - 127);
    }
  }
  if (zeros.numel() == 0) {
    for (int64_t g = 0; g < groups; ++g) z[g] = static_cast<float>(1 << (bits - 1));
  } else {
    const uint8_t* p = zeros.data_ptr<uint8_t>() + row * groups;
    for (int64_t g = 0; g < groups; ++g) z[g] = static_cast<float>(p[g]);
  }
}

// Kept codes [from, kept) of one row, every activation row.
void row_portable(const Shape& sh, const float* x, int64_t rows, const uint8_t* q,
                  const uint8_t* idx, const float* s, const float* z, int64_t from, float* acc) {
  for (int64_t j = from; j < sh.kept; ++j) {
    const uint32_t code = read_bits(q, sh.q_stride, j * sh.bits, sh.bits);
    const uint32_t pos = read_bits(idx, sh.i_stride, j * sh.index_bits, sh.index_bits);
    const int64_t col = (j / sh.n) * sh.m + pos;
    const int64_t g = col / sh.group;
    const float w = (static_cast<float>(code) - z[g]) * s[g];
    for (int64_t r = 0; r < rows; ++r) acc[r] += w * x[r * sh.k_cols + col];
  }
}

bool vector_shape(const Shape& sh, int64_t step) {
  return sh.index_bits == 2 && sh.m == 2 * sh.n && step % sh.n == 0 &&
         (sh.bits == 2 || sh.bits == 4 || sh.bits == 8) && (sh.group / sh.m * sh.n) % step == 0;
}

#if defined(NM_AVX512)
// The operations the row loop needs, for each instruction set: a step is 16 kept codes.
using Vec = __m512;
using IVec = __m512i;
constexpr int64_t kStep = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float v) { return _mm512_set1_ps(v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline IVec iadd(IVec a, IVec b) { return _mm512_add_epi32(a, b); }

// Lanes of `word` cut into fields of `width` bits (width 2 or 4: 16 fields fill 32 / 64 bits).
inline IVec fields(uint64_t word, int width) {
  const IVec lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const IVec mask = _mm512_set1_epi32((1 << width) - 1);
  if (width == 2) {
    const IVec shift = _mm512_slli_epi32(lane, 1);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shift),
                            mask);
  }
  // 4 bits: lanes 0-7 read the low 32 bits, lanes 8-15 the high 32
  const IVec both = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(word))),
      _mm256_set1_epi32(static_cast<int>(word >> 32)), 1);
  const IVec shift = _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(7)), 2);
  return _mm512_and_si512(_mm512_srlv_epi32(both, shift), mask);
}

inline IVec byte_lanes(const uint8_t* q) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
}

inline Vec to_float(IVec v) { return _mm512_cvtepi32_ps(v); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline IVec lane_runs(int64_t n, int64_t m) {  // (lane / n) * m
  const IVec lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_mullo_epi32(n == 2 ? _mm512_srli_epi32(lane, 1) : lane,
                            _mm512_set1_epi32(static_cast<int>(m)));
}

// The activations at columns `col` (0..31) of the 32 starting at xr: one two-source permute.
inline Vec pick(const float* xr, IVec col) {
  return _mm512_permutex2var_ps(_mm512_loadu_ps(xr), col, _mm512_loadu_ps(xr + 16));
}
#elif defined(NM_AVX2)
using Vec = __m256;
using IVec = __m256i;
constexpr int64_t kStep = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float v) { return _mm256_set1_ps(v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  __m128 lo = _mm256_castps256_ps128(v);
  lo = _mm_add_ps(lo, _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}
inline IVec iadd(IVec a, IVec b) { return _mm256_add_epi32(a, b); }

// Lanes of `word` cut into fields of `width` bits (width 2 or 4: 8 fields fill 16 / 32 bits).
inline IVec fields(uint64_t word, int width) {
  const IVec lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const IVec shift = width == 2 ? _mm256_slli_epi32(lane, 1) : _mm256_slli_epi32(lane, 2);
  return _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shift),
      _mm256_set1_epi32((1 << width) - 1));
}

inline IVec byte_lanes(const uint8_t* q) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
}

inline Vec to_float(IVec v) { return _mm256_cvtepi32_ps(v); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline IVec lane_runs(int64_t n, int64_t m) {
  const IVec lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_mullo_epi32(n == 2 ? _mm256_srli_epi32(lane, 1) : lane,
                            _mm256_set1_epi32(static_cast<int>(m)));
}

// The activations at columns `col` (0..15) of the 16 starting at xr. With m = 2n, lanes 0-3
// always read columns 0-7 and lanes 4-7 columns 8-15: a permute of each half (the low 3 bits of
// the column) and a fixed blend.
inline Vec pick(const float* xr, IVec col) {
  return _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xr), col),
                         _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8), col), 0xF0);
}
#endif

#if defined(NM_AVX512) || defined(NM_AVX2)
// A step's kept codes: 2 or 4 bits read as one word (kStep codes fill it), 8 bits as bytes.
inline IVec step_codes(const uint8_t* q, int64_t j, int bits) {
  uint64_t word = 0;  // constant-size copies: a variable one is a library call
  if (bits == 4) {
    std::memcpy(&word, q + j / 2, kStep / 2);
    return fields(word, 4);
  }
  if (bits == 2) {
    std::memcpy(&word, q + j / 4, kStep / 4);
    return fields(word, 2);
  }
  return byte_lanes(q + j);
}

// The whole row (vector_shape holds: m = 2n, 2-bit positions, groups of whole steps). Within a
// scale group the sums of (code - zero) * x are kept apart and take the scale once at its end.
template <int kRows>
int64_t row_vector(const Shape& sh, const float* x, const uint8_t* q, const uint8_t* idx,
                   const float* s, const float* z, float* out) {
  const IVec run = lane_runs(sh.n, sh.m);
  const int64_t per_group = sh.group / 2;  // kept codes a scale group holds (m = 2n)
  const int64_t end = sh.kept - sh.kept % per_group;
  Vec acc[kRows];  // a compile-time count: the accumulators stay in registers
  for (int r = 0; r < kRows; ++r) acc[r] = vzero();
  for (int64_t start = 0, g = 0; start < end; start += per_group, ++g) {
    const Vec zero = vset(z[g]);
    Vec block[kRows];
    for (int r = 0; r < kRows; ++r) block[r] = vzero();
    for (int64_t j = start; j < start + per_group; j += kStep) {
      uint64_t positions = 0;
      std::memcpy(&positions, idx + j / 4, kStep / 4);
      const IVec col = iadd(fields(positions, 2), run);  // relative to the step's first column
      const Vec w = vsub(to_float(step_codes(q, j, sh.bits)), zero);
      for (int r = 0; r < kRows; ++r) {
        block[r] = vfma(w, pick(x + r * sh.k_cols + 2 * j, col), block[r]);
      }
    }
    const Vec scale = vset(s[g]);
    for (int r = 0; r < kRows; ++r) acc[r] = vfma(block[r], scale, acc[r]);
  }
  for (int r = 0; r < kRows; ++r) out[r] = vsum(acc[r]);
  return end;
}
#endif

#if defined(NM_AVX512) || defined(NM_AVX2)
int64_t row_vector_rows(const Shape& sh, const float* x, int64_t rows, const uint8_t* q,
                        const uint8_t* idx, const float* s, const float* z, float* out) {
  switch (rows) {
    case 1: return row_vector<1>(sh, x, q, idx, s, z, out);
    case 2: return row_vector<2>(sh, x, q, idx, s, z, out);
    case 3: return row_vector<3>(sh, x, q, idx, s, z, out);
    case 4: return row_vector<4>(sh, x, q, idx, s, z, out);
    case 5: return row_vector<5>(sh, x, q, idx, s, z, out);
    case 6: return row_vector<6>(sh, x, q, idx, s, z, out);
    case 7: return row_vector<7>(sh, x, q, idx, s, z, out);
    default: return row_vector<8>(sh, x, q, idx, s, z, out);
  }
}
#endif

}  // namespace

bool vectorized() {
#if defined(NM_AVX512) || defined(NM_AVX2)
  return true;
#else
  return false;
#endif
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor qindex,
                   torch::Tensor scales, torch::Tensor zeros, int64_t bits, int64_t index_bits,
                   int64_t n, int64_t m, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous (R, K) float32 tensor");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most ", kMaxRows, " activation rows a call");
  TORCH_CHECK(qweight.is_contiguous() && qindex.is_contiguous() && scales.is_contiguous(),
              "packed tensors must be contiguous");
  TORCH_CHECK(zeros.numel() == 0 || (zeros.scalar_type() == torch::kUInt8 &&
                                     zeros.sizes() == scales.sizes() && zeros.is_contiguous()),
              "zeros must be empty or (N, G) uint8 like scales");
  Shape sh;
  sh.k_cols = x.size(1);
  sh.n = n;
  sh.m = m;
  sh.kept = sh.k_cols / m * n;
  sh.group = group;
  sh.bits = static_cast<int>(bits);
  sh.index_bits = static_cast<int>(index_bits);
  sh.q_stride = qweight.size(1);
  sh.i_stride = qindex.size(1);
  TORCH_CHECK(sh.q_stride == (sh.kept * bits + 7) / 8, "qweight rows have the wrong size");
  TORCH_CHECK(sh.i_stride == (sh.kept * index_bits + 7) / 8, "qindex rows have the wrong size");
  const int64_t rows = x.size(0), out_features = qweight.size(0);
  auto out = torch::empty({rows, out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const uint8_t* ip = qindex.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> s, z;
    float acc[kMaxRows];
    for (int64_t o = begin; o < end; ++o) {
      row_params(scales, zeros, o, sh.bits, s, z);
      const uint8_t* q = qp + o * sh.q_stride;
      const uint8_t* idx = ip + o * sh.i_stride;
      int64_t from = 0;
      for (int64_t r = 0; r < rows; ++r) acc[r] = 0.f;
#if defined(NM_AVX512) || defined(NM_AVX2)
      if (vector_shape(sh, kStep)) {
        from = row_vector_rows(sh, xp, rows, q, idx, s.data(), z.data(), acc);
      }
#endif
      row_portable(sh, xp, rows, q, idx, s.data(), z.data(), from, acc);
      for (int64_t r = 0; r < rows; ++r) op[r * out_features + o] = acc[r];
    }
  });
  return out;
}
