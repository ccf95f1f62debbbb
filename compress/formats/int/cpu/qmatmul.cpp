// Fused unpack + dequantize + dot for densely packed integer weights (compress.export.packing).
//
// Weights: (N, row_bytes) uint8, each row a little-endian bit stream of K codes of B bits.
// Scales: (N, G) fp32/fp16/bf16; zero points: one packed B-bit stream of N*G codes, or none
// (symmetric: zero = 2**(B-1)). W[n,k] = (code - zero[n, k/g]) * scale[n, k/g].
//
// Batch-1 decode is bound by the bytes of packed weights, so the GEMV never materialises a
// dequantized weight. Two inner loops:
// - fp32 activations (exact): eight codes are unpacked into one AVX2 register and multiplied
//   with fp32 x; the scale is applied once per group and the zero point through the per-group
//   sum of x (sum_k (c_k - z) s x_k = s (sum_k c_k x_k - z sum_k x_k)).
// - bf16/fp16 activations: x is rounded to int16 per chunk of 64-128 inputs and 16 codes at a
//   time meet it in one integer multiply-add (vpmaddwd; AVX-512 VNNI: vpdpwssd on 32), about
//   2.5x fewer instructions per weight; see gemv_tile_wide.
// Larger batches (prefill) dequantize a cache-sized tile of rows (to bf16 where the CPU's GEMM
// is faster in bf16, else fp32) and hand it to torch's GEMM; on AMX CPUs bf16 activations take
// a GEMM of our own instead (qmatmul_amx.cpp).
//
// One translation unit in four files, concatenated in this order by compress.export.cpu:
// qmatmul.cpp (layout, portable and AVX2 kernels), qmatmul_avx512.cpp, qmatmul_amx.cpp,
// qmatmul_api.cpp (the functions bound into Python). The instruction set is the build's
// (compress.utils.native: one binary per level, never -march=native); the macros below name it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define COMPRESS_AVX2 1
#endif
#if defined(COMPRESS_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define COMPRESS_AVX512 1
#endif
#if defined(COMPRESS_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && \
    defined(__AVX512BF16__)
#define COMPRESS_AMX 1
#endif

namespace {

struct Packed {
  const uint8_t* qweight;
  const uint8_t* end;     // one past the last weight byte: reads never cross it
  const uint8_t* qzeros;  // nullptr when symmetric
  const uint8_t* zeros_end;  // one past the last zero-point byte
  const void* scales;
  int scale_kind;  // 0 fp32, 1 fp16, 2 bf16, 3 E8M0 (uint8 biased exponent)
  int bits;
  int64_t N, K, row_bytes, group, groups;

  float scale(int64_t n, int64_t g) const {
    const int64_t i = n * groups + g;
    switch (scale_kind) {
      case 0: return static_cast<const float*>(scales)[i];
      case 1:
#ifdef __F16C__
        return _cvtsh_ss(static_cast<const uint16_t*>(scales)[i]);
#else
        return static_cast<float>(static_cast<const at::Half*>(scales)[i]);
#endif
      case 2: return static_cast<float>(static_cast<const at::BFloat16*>(scales)[i]);
      default: return e8m0(static_cast<const uint8_t*>(scales)[i]);
    }
  }

  // 2**(e - 127) by its bit pattern: e << 23 for e >= 1; e = 0 is the subnormal 2**-127
  // (0x00400000, which exceeds no normal pattern, so a max picks it), 255 reads as infinity.
  static float e8m0(uint8_t e) {
    const uint32_t bits = std::max<uint32_t>(static_cast<uint32_t>(e) << 23, 0x00400000u);
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }

  float zero(int64_t n, int64_t g) const {
    if (qzeros == nullptr) return static_cast<float>(1 << (bits - 1));
    const int64_t bit = (n * groups + g) * bits;
    const int64_t byte = bit >> 3;
    const int shift = static_cast<int>(bit & 7);
    uint32_t v = qzeros[byte];
    if (shift + bits > 8) v |= static_cast<uint32_t>(qzeros[byte + 1]) << 8;
    return static_cast<float>((v >> shift) & ((1u << bits) - 1));
  }

  int code(int64_t n, int64_t k) const {
    const uint8_t* row = qweight + n * row_bytes;
    const int64_t bit = k * bits;
    const int64_t byte = bit >> 3;
    const int shift = static_cast<int>(bit & 7);
    uint32_t v = row[byte];
    if (shift + bits > 8) v |= static_cast<uint32_t>(row[byte + 1]) << 8;
    return static_cast<int>((v >> shift) & ((1u << bits) - 1));
  }
};

Packed make_packed(const torch::Tensor& qweight, const torch::Tensor& scales,
                   const torch::Tensor& qzeros, int64_t bits, int64_t group, int64_t K) {
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous() &&
                  qweight.dim() == 2, "qweight must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be in 2..8");
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 2, "scales must be contiguous 2-D");
  Packed p{};
  p.N = qweight.size(0);
  p.K = K;
  p.row_bytes = qweight.size(1);
  TORCH_CHECK(p.row_bytes == (K * bits + 7) / 8, "qweight row bytes do not match K and bits");
  p.group = group > 0 ? group : K;
  TORCH_CHECK(K % p.group == 0, "group size must divide K");
  p.groups = K / p.group;
  TORCH_CHECK(scales.size(0) == p.N && scales.size(1) == p.groups, "scales shape mismatch");
  p.bits = static_cast<int>(bits);
  p.qweight = qweight.data_ptr<uint8_t>();
  p.end = p.qweight + p.N * p.row_bytes;
  if (qzeros.numel() > 0) {
    TORCH_CHECK(qzeros.scalar_type() == torch::kUInt8 && qzeros.is_contiguous(),
                "qzeros must be contiguous uint8");
    TORCH_CHECK(qzeros.numel() >= (p.N * p.groups * bits + 7) / 8, "qzeros too short");
    p.qzeros = qzeros.data_ptr<uint8_t>();
    p.zeros_end = p.qzeros + qzeros.numel();
  }
  p.scales = scales.data_ptr();
  switch (scales.scalar_type()) {
    case torch::kFloat: p.scale_kind = 0; break;
    case torch::kHalf: p.scale_kind = 1; break;
    case torch::kBFloat16: p.scale_kind = 2; break;
    case torch::kByte: p.scale_kind = 3; break;
    default: TORCH_CHECK(false, "scales must be fp32, fp16, bf16 or uint8 (E8M0)");
  }
  return p;
}

// Portable path: one row dequantized with scalar code, any group size.
void dequant_row_scalar(const Packed& p, int64_t n, float* out) {
  for (int64_t g = 0; g < p.groups; ++g) {
    const float s = p.scale(n, g), z = p.zero(n, g);
    for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) {
      out[k] = (static_cast<float>(p.code(n, k)) - z) * s;
    }
  }
}

// bf16 by round-to-nearest-even of the fp32 value, as torch's .to(torch.bfloat16) rounds
// (finite inputs only: weights are finite).
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Portable path to bf16: the fp32 value of dequant_row_scalar, rounded.
void dequant_row_scalar_bf16(const Packed& p, int64_t n, uint16_t* out) {
  for (int64_t g = 0; g < p.groups; ++g) {
    const float s = p.scale(n, g), z = p.zero(n, g);
    for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) {
      out[k] = bf16_bits((static_cast<float>(p.code(n, k)) - z) * s);
    }
  }
}

#ifdef COMPRESS_AVX2

// Eight B-bit codes starting at a byte boundary -> eight int32 lanes.
template <int B>
struct Decoder {
  static constexpr int kRead = (B == 2 || B == 4 || B == 8) ? B : 8;
  __m256i ctrl, shift, mask;

  Decoder() {
    alignas(32) int8_t c[32];
    alignas(32) int32_t s[8];
    for (int k = 0; k < 8; ++k) {
      const int bit = k * B, byte = bit / 8;
      s[k] = bit % 8;
      // the 8 source bytes sit in both 128-bit halves, so in-half indices 0..7 reach them all
      int8_t* lane = c + 4 * k;
      lane[0] = static_cast<int8_t>(byte);
      lane[1] = (s[k] + B > 8) ? static_cast<int8_t>(byte + 1) : static_cast<int8_t>(-128);
      lane[2] = lane[3] = static_cast<int8_t>(-128);
    }
    ctrl = _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
    if (B == 4) {
      shift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    } else if (B == 2) {
      shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    } else {
      shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    }
    mask = _mm256_set1_epi32((1 << B) - 1);
  }

  static inline uint64_t load(const uint8_t* src) {
    if (kRead == 2) {
      uint16_t t;
      std::memcpy(&t, src, 2);
      return t;
    }
    if (kRead == 4) {
      uint32_t t;
      std::memcpy(&t, src, 4);
      return t;
    }
    uint64_t t;
    std::memcpy(&t, src, 8);
    return t;
  }

  // The stream's last block: never read past the tensor.
  __attribute__((noinline)) static uint64_t load_tail(const uint8_t* src, const uint8_t* end) {
    uint64_t v = 0;
    std::memcpy(&v, src, static_cast<size_t>(end - src));
    return v;
  }

  inline __m256i operator()(const uint8_t* src, const uint8_t* end) const {
    // typed loads: a narrow memcpy into a wider stack word would stall store forwarding
    const uint64_t v = __builtin_expect(src + kRead <= end, 1) ? load(src) : load_tail(src, end);
    if (B == 8) return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(v)));
    if (B == 2 || B == 4) {
      const __m256i word = _mm256_set1_epi32(static_cast<int32_t>(v));
      return _mm256_and_si256(_mm256_srlv_epi32(word, shift), mask);
    }
    const __m256i bytes = _mm256_set1_epi64x(static_cast<int64_t>(v));
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, ctrl), shift), mask);
  }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Super-blocks: 64 codes decoded at once into eight vectors with constant shifts only, the
// cheapest unpack there is. The lanes come out transposed (vector v, lane j holds code
// perm(v, j) of the block), so the activations are permuted the same way once per call.
// Widths 2, 3, 4, 6 and 8 have one; 5 and 7 use the per-8 Decoder in natural order.
constexpr bool has_super(int B) { return B == 2 || B == 3 || B == 4 || B == 6 || B == 8; }

// Position inside a 64-code super-block of lane j of vector v.
inline int super_perm(int B, int v, int j) {
  return B >= 6 ? 32 * (v / 4) + 4 * j + v % 4 : 8 * j + v;
}

template <int B>
struct Super {
  __m256i ctrl, mask;

  Super() {
    // 3- and 6-bit: 24 bytes -> eight 32-bit lanes of 3 bytes; the high half is loaded from
    // byte 8, so its lanes start at in-half index 4 (no read beyond the 24 bytes).
    alignas(32) int8_t c[32];
    for (int j = 0; j < 8; ++j) {
      const int base = j < 4 ? 3 * j : 4 + 3 * (j - 4);
      for (int b = 0; b < 3; ++b) c[4 * j + b] = static_cast<int8_t>(base + b);
      c[4 * j + 3] = static_cast<int8_t>(-128);
    }
    ctrl = _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
    mask = _mm256_set1_epi32((1 << B) - 1);
  }

  inline __m256i load24(const uint8_t* src) const {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8));
    return _mm256_shuffle_epi8(_mm256_set_m128i(hi, lo), ctrl);
  }

  // Bytes one super-block takes: 64 * B / 8.
  static constexpr int kBytes = 8 * B;

  inline void decode(const uint8_t* src, __m256i out[8]) const {
    if (B == 4) {  // lane j = bytes 4j..4j+3 = codes 8j..8j+7
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      for (int i = 0; i < 8; ++i) out[i] = _mm256_and_si256(_mm256_srli_epi32(v, 4 * i), mask);
    } else if (B == 2) {  // lane j = 16 bits = codes 8j..8j+7
      const __m256i v =
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      for (int i = 0; i < 8; ++i) out[i] = _mm256_and_si256(_mm256_srli_epi32(v, 2 * i), mask);
    } else if (B == 3) {  // lane j = 24 bits = codes 8j..8j+7
      const __m256i v = load24(src);
      for (int i = 0; i < 8; ++i) out[i] = _mm256_and_si256(_mm256_srli_epi32(v, 3 * i), mask);
    } else if (B == 6) {  // two halves of 32 codes; lane j = 24 bits = codes 4j..4j+3
      for (int h = 0; h < 2; ++h) {
        const __m256i v = load24(src + 24 * h);
        for (int i = 0; i < 4; ++i) {
          out[4 * h + i] = _mm256_and_si256(_mm256_srli_epi32(v, 6 * i), mask);
        }
      }
    } else {  // B == 8: two halves of 32 codes; lane j = bytes 4j..4j+3
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h));
        for (int i = 0; i < 3; ++i) {
          out[4 * h + i] = _mm256_and_si256(_mm256_srli_epi32(v, 8 * i), mask);
        }
        out[4 * h + 3] = _mm256_srli_epi32(v, 24);
      }
    }
  }
};

// MT activation rows against weight rows [n0, n1). x: (MT, Kp) zero-padded, its first
// `ksuper` columns permuted per super-block when SUPER; xsum: (MT, G).
template <int B, int MT, bool SUPER>
void gemv_tile(const Packed& p, const float* x, int64_t Kp, int64_t ksuper, const float* xsum,
               float* out, int64_t out_stride, int64_t n0, int64_t n1) {
  constexpr int U = MT >= 4 ? 1 : 4 / MT;  // independent FMA chains to hide FMA latency
  const Decoder<B> dec;
  const Super<B> sup;
  const int64_t group = p.groups == 1 ? Kp : p.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qweight + n * p.row_bytes;
    __m256 acc[U][MT];
    float zterm[MT];
    for (int m = 0; m < MT; ++m) {
      for (int u = 0; u < U; ++u) acc[u][m] = _mm256_setzero_ps();
      zterm[m] = 0.f;
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      __m256 ga[U][MT];
      for (int u = 0; u < U; ++u)
        for (int m = 0; m < MT; ++m) ga[u][m] = _mm256_setzero_ps();
      int64_t k = g * group;
      const int64_t k1 = k + group;
      if (SUPER) {
        const int64_t ks1 = std::min(k1, ksuper);
        for (; k + 64 <= ks1; k += 64) {
          __m256i codes[8];
          sup.decode(row + k / 8 * B, codes);
          for (int i = 0; i < 8; ++i) {
            const __m256 w = _mm256_cvtepi32_ps(codes[i]);
            for (int m = 0; m < MT; ++m) {
              ga[i % U][m] =
                  _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * Kp + k + 8 * i), ga[i % U][m]);
            }
          }
        }
      }
      for (; k + 8 * U <= k1; k += 8 * U) {
        for (int u = 0; u < U; ++u) {
          const __m256 w = _mm256_cvtepi32_ps(dec(row + (k / 8 + u) * B, p.end));
          for (int m = 0; m < MT; ++m) {
            ga[u][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * Kp + k + 8 * u), ga[u][m]);
          }
        }
      }
      for (; k < k1; k += 8) {
        const __m256 w = _mm256_cvtepi32_ps(dec(row + k / 8 * B, p.end));
        for (int m = 0; m < MT; ++m) {
          ga[0][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * Kp + k), ga[0][m]);
        }
      }
      const float s = p.scale(n, g), z = p.zero(n, g);
      const __m256 sv = _mm256_set1_ps(s);
      for (int m = 0; m < MT; ++m) {
        // scale each chain separately: no add chain between groups
        for (int u = 0; u < U; ++u) acc[u][m] = _mm256_fmadd_ps(ga[u][m], sv, acc[u][m]);
        zterm[m] += s * z * xsum[m * p.groups + g];
      }
    }
    for (int m = 0; m < MT; ++m) {
      __m256 t = acc[0][m];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[u][m]);
      out[m * out_stride + n] = hsum(t) - zterm[m];
    }
  }
}

template <int B>
void dequant_rows_avx2(const Packed& p, int64_t n0, int64_t n1, float* out) {
  const Decoder<B> dec;
  const int64_t blocks = (p.K + 7) / 8;
  const int64_t full = p.K / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qweight + n * p.row_bytes;
    // the next row, a line per step ahead of the loop (see Bf16Rows::row)
    const char* ahead = reinterpret_cast<const char*>(n + 1 < p.N ? row + p.row_bytes : row);
    float* dst = out + (n - n0) * p.K;
    for (int64_t g = 0; g < p.groups; ++g) {
      const __m256 sv = _mm256_set1_ps(p.scale(n, g));
      const __m256 zv = _mm256_set1_ps(p.zero(n, g));
      const int64_t j0 = g * p.group / 8;
      const int64_t j1 = p.groups == 1 ? blocks : j0 + p.group / 8;
      for (int64_t j = j0; j < j1; ++j) {
        if ((j & 7) == 0) _mm_prefetch(ahead + j * B, _MM_HINT_T0);
        const __m256 c = _mm256_cvtepi32_ps(dec(row + j * B, p.end));
        const __m256 w = _mm256_mul_ps(_mm256_sub_ps(c, zv), sv);
        if (j < full) {
          _mm256_storeu_ps(dst + 8 * j, w);
        } else {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, w);
          std::memcpy(dst + 8 * j, tmp, sizeof(float) * static_cast<size_t>(p.K - 8 * j));
        }
      }
    }
  }
}

// Eight fp32 -> eight bf16 (round to nearest even, finite inputs), in order.
inline __m128i bf16x8(__m256 w) {
  const __m256i u = _mm256_castps_si256(w);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

template <int B>
void dequant_rows_avx2_bf16(const Packed& p, int64_t n0, int64_t n1, uint16_t* out,
                            int64_t ld) {
  const Decoder<B> dec;
  const int64_t blocks = (p.K + 7) / 8;
  const int64_t full = p.K / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qweight + n * p.row_bytes;
    // the next row, a line per step ahead of the loop (see Bf16Rows::row)
    const char* ahead = reinterpret_cast<const char*>(n + 1 < p.N ? row + p.row_bytes : row);
    uint16_t* dst = out + (n - n0) * ld;
    for (int64_t g = 0; g < p.groups; ++g) {
      const __m256 sv = _mm256_set1_ps(p.scale(n, g));
      const __m256 zv = _mm256_set1_ps(p.zero(n, g));
      const int64_t j0 = g * p.group / 8;
      const int64_t j1 = p.groups == 1 ? blocks : j0 + p.group / 8;
      for (int64_t j = j0; j < j1; ++j) {
        if ((j & 7) == 0) _mm_prefetch(ahead + j * B, _MM_HINT_T0);
        const __m256 c = _mm256_cvtepi32_ps(dec(row + j * B, p.end));
        const __m128i w = bf16x8(_mm256_mul_ps(_mm256_sub_ps(c, zv), sv));
        if (j < full) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8 * j), w);
        } else {
          alignas(16) uint16_t tmp[8];
          _mm_store_si128(reinterpret_cast<__m128i*>(tmp), w);
          std::memcpy(dst + 8 * j, tmp, sizeof(uint16_t) * static_cast<size_t>(p.K - 8 * j));
        }
      }
    }
  }
}

// At least ~128k weights per thread: a fork/join costs a few microseconds on idle cores (far
// more when they are oversubscribed), about what 30k weights take; SmolLM2's 1536x576 still
// splits over two cores (82 -> 53 us measured on the 2-core reference machine).
inline int64_t rows_per_thread(const Packed& p) {
  return std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, p.K));
}

// Weight rows split over the threads; activation rows in tiles of 4, 2, then 1:
// tile(mt, m, n0, n1) with mt a std::integral_constant holding the tile height.
template <typename Tile>
void over_tiles(const Packed& p, int64_t M, const Tile& tile) {
  at::parallel_for(0, p.N, rows_per_thread(p), [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile(std::integral_constant<int, 4>{}, m, n0, n1);
    for (; m + 2 <= M; m += 2) tile(std::integral_constant<int, 2>{}, m, n0, n1);
    for (; m < M; ++m) tile(std::integral_constant<int, 1>{}, m, n0, n1);
  });
}

template <int B, bool SUPER>
void gemv_run(const Packed& p, const float* x, int64_t M, int64_t Kp, int64_t ksuper,
              const float* xsum, float* out) {
  over_tiles(p, M, [&](auto mt, int64_t m, int64_t n0, int64_t n1) {
    gemv_tile<B, decltype(mt)::value, SUPER>(p, x + m * Kp, Kp, ksuper, xsum + m * p.groups,
                                             out + m * p.N, p.N, n0, n1);
  });
}

// Whole 64-code blocks lie inside one group (the super-block and int16 paths need that).
inline bool blocks_fit(const Packed& p) { return p.groups == 1 || p.group % 64 == 0; }

inline bool super_ok(const Packed& p) { return has_super(p.bits) && blocks_fit(p); }

template <int B>
void gemv_bits(const Packed& p, const float* x, int64_t M, int64_t Kp, int64_t ksuper,
               const float* xsum, float* out) {
  if constexpr (has_super(B)) {
    if (ksuper > 0) return gemv_run<B, true>(p, x, M, Kp, ksuper, xsum, out);
  }
  gemv_run<B, false>(p, x, M, Kp, 0, xsum, out);
}

// fp32 activations: x zero-padded to Kp, its super-blocks permuted; zero point via group sums.
void gemv_fp32(const Packed& p, const float* xs, int64_t M, int64_t K, float* o) {
  const int64_t Kp = (K + 7) / 8 * 8;
  const int64_t ksuper = super_ok(p) ? K / 64 * 64 : 0;
  std::vector<float> xpad(static_cast<size_t>(M * Kp), 0.f);
  std::vector<float> xsum(static_cast<size_t>(M * p.groups), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xpad.data() + m * Kp;
    const float* src = xs + m * K;
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(K));
    for (int64_t c = 0; c < ksuper; c += 64) {
      for (int v = 0; v < 8; ++v)
        for (int j = 0; j < 8; ++j) dst[c + 8 * v + j] = src[c + super_perm(p.bits, v, j)];
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) s += src[k];
      xsum[m * p.groups + g] = s;
    }
  }
  switch (p.bits) {
    case 2: return gemv_bits<2>(p, xpad.data(), M, Kp, ksuper, xsum.data(), o);
    case 3: return gemv_bits<3>(p, xpad.data(), M, Kp, ksuper, xsum.data(), o);
    case 4: return gemv_bits<4>(p, xpad.data(), M, Kp, ksuper, xsum.data(), o);
    case 5: return gemv_bits<5>(p, xpad.data(), M, Kp, ksuper, xsum.data(), o);
    case 6: return gemv_bits<6>(p, xpad.data(), M, Kp, ksuper, xsum.data(), o);
    case 7: return gemv_bits<7>(p, xpad.data(), M, Kp, ksuper, xsum.data(), o);
    default: return gemv_bits<8>(p, xpad.data(), M, Kp, ksuper, xsum.data(), o);
  }
}

// ---- int16 activations: half-precision inputs only
//
// With bf16/fp16 activations the dot products run in integers: x is rounded to int16 per chunk
// of up to 128 codes (x ~ q * scale, |q| <= 32767, finer than the input's own rounding for all
// but elements far below the chunk's largest), and one vpmaddwd multiplies 16 codes with 16
// activations and adds pairs. Unpacking to 16-bit lanes takes one shift and one mask per 16
// codes, against a shift, mask, int->float convert and FMA per 8 codes in the fp32 path: the
// kernel is no longer bound by instructions but by the bytes of packed weights.

// 64 codes -> four vectors of sixteen int16 codes. Lane j of vector v holds code wide_perm(v, j).
// 7-bit codes do not fit: two of them span three bytes.
constexpr bool has_wide(int B) { return B != 7; }

inline int wide_perm(int B, int v, int j) {
  if (B == 8) return 16 * v + j;
  if (B == 5 || B == 6) return 32 * (v / 2) + 2 * j + v % 2;
  return 4 * j + v;
}

template <int B>
struct Wide {
  // 3, 5 and 6 bits: a run of 16 lanes of L bits (3: four codes, 5 and 6: two codes) whose
  // high half is loaded from byte kHigh, so both halves read inside the run.
  static constexpr int L = B == 5 ? 10 : 12;
  static constexpr int kRun = 2 * L;  // bytes
  static constexpr int kHigh = kRun - 16;
  __m256i ctrl, align, mask;

  Wide() {
    // Lane j takes the two bytes holding bits [L j, L j + L) of the run, then is multiplied by
    // 2^(16 - L - bit offset) so every lane's codes start at bit 16 - L (shifted-out bits are
    // the neighbours').
    alignas(32) int8_t c[32];
    alignas(32) int16_t a[16];
    for (int j = 0; j < 16; ++j) {
      const int bit = L * j;
      const int byte = bit / 8 - (j < 8 ? 0 : kHigh);
      c[2 * j] = static_cast<int8_t>(byte);
      c[2 * j + 1] = static_cast<int8_t>(byte + 1);
      a[j] = static_cast<int16_t>(1 << (16 - L - bit % 8));
    }
    ctrl = _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
    align = _mm256_load_si256(reinterpret_cast<const __m256i*>(a));
    mask = _mm256_set1_epi16(static_cast<int16_t>((1 << B) - 1));
  }

  inline __m256i load_run(const uint8_t* src) const {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kHigh));
    return _mm256_mullo_epi16(_mm256_shuffle_epi8(_mm256_set_m128i(hi, lo), ctrl), align);
  }

  // Reads exactly the 8 * B bytes of the block.
  inline void decode(const uint8_t* src, __m256i out[4]) const {
    if (B == 4) {  // lane j = bytes 2j, 2j+1 = codes 4j..4j+3
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      for (int i = 0; i < 3; ++i) out[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4 * i), mask);
      out[3] = _mm256_srli_epi16(v, 12);
    } else if (B == 2) {  // lane j = byte j = codes 4j..4j+3
      const __m256i v =
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      for (int i = 0; i < 3; ++i) out[i] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * i), mask);
      out[3] = _mm256_srli_epi16(v, 6);
    } else if (B == 3) {  // one run; lane j = codes 4j..4j+3 from bit 4
      const __m256i v = load_run(src);
      for (int i = 0; i < 3; ++i) out[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4 + 3 * i), mask);
      out[3] = _mm256_srli_epi16(v, 13);
    } else if (B == 5 || B == 6) {  // two runs; lane j = codes 2j, 2j+1 of the run
      for (int h = 0; h < 2; ++h) {
        const __m256i v = load_run(src + kRun * h);
        out[2 * h] = _mm256_and_si256(_mm256_srli_epi16(v, 16 - 2 * B), mask);
        out[2 * h + 1] = _mm256_srli_epi16(v, 16 - B);
      }
    } else {  // B == 8
      for (int i = 0; i < 4; ++i) {
        out[i] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * i)));
      }
    }
  }
};

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// x rounded to int16, chunk by chunk: a chunk is 64 or 128 codes and never straddles a weight
// group. Per-chunk arrays are padded to whole octets of chunks with zeros.
struct QuantActs {
  int64_t rows, ksuper, chunk, chunks, padded, per_group;  // per_group: chunks per weight group
  std::vector<int16_t> q;      // (rows, ksuper), each 64-code block in the kernel's order
  std::vector<float> scale;    // (rows, padded): x ~ q * scale
  std::vector<int32_t> qsum;   // (rows, padded): sum of q over the chunk, for the zero point

  // False when some chunk is not finite: the caller keeps to fp32, which propagates inf/nan.
  // perm[t]: the input position that block position t takes (the kernel's lane order).
  bool build(const Packed& p, const float* x, int64_t M, int64_t K, int64_t ks,
             const int8_t perm[64]) {
    rows = M;
    ksuper = ks;
    chunk = (p.groups == 1 || p.group % 128 == 0) ? 128 : 64;  // fewer flushes where allowed
    chunks = (ksuper + chunk - 1) / chunk;
    padded = (chunks + 7) / 8 * 8;
    per_group = p.groups == 1 ? padded : p.group / chunk;
    q.assign(static_cast<size_t>(M * ksuper), 0);
    scale.assign(static_cast<size_t>(M * padded), 0.f);
    qsum.assign(static_cast<size_t>(M * padded), 0);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    alignas(32) int16_t natural[64];
    for (int64_t m = 0; m < M; ++m) {
      const float* src = x + m * K;
      int16_t* dst = q.data() + m * ksuper;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t k0 = c * chunk, k1 = std::min(k0 + chunk, ksuper);
        __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int64_t k = k0; k < k1; k += 8) {
          const __m256 v = _mm256_and_ps(_mm256_loadu_ps(src + k), abs_mask);
          vmax = _mm256_max_ps(vmax, v);
          bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));  // inf or nan
        }
        if (_mm256_movemask_ps(bad) != 0) return false;
        const float amax = hmax(vmax);
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
        __m256i total = _mm256_setzero_si256();
        for (int64_t b = k0; b < k1; b += 64) {
          for (int t = 0; t < 4; ++t) {  // round to nearest even (the MXCSR default)
            const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + b + 16 * t), inv));
            const __m256i hi =
                _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + b + 16 * t + 8), inv));
            total = _mm256_add_epi32(total, _mm256_add_epi32(lo, hi));
            const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
            _mm256_store_si256(reinterpret_cast<__m256i*>(natural + 16 * t), packed);
          }
          for (int t = 0; t < 64; ++t) dst[b + t] = natural[perm[t]];
        }
        scale[m * padded + c] = amax / 32767.f;
        qsum[m * padded + c] = hsum_epi32(total);
      }
    }
    return true;
  }
};

// Scales of groups g..g+7 of row n as fp32.
inline __m256 scales8(const Packed& p, int64_t n, int64_t g) {
  const int64_t i = n * p.groups + g;
  if (p.scale_kind == 0) return _mm256_loadu_ps(static_cast<const float*>(p.scales) + i);
  if (p.scale_kind == 3) {  // E8M0: the exponent byte shifted into place (see Packed::e8m0)
    const __m256i e = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(p.scales) + i)));
    return _mm256_castsi256_ps(
        _mm256_max_epu32(_mm256_slli_epi32(e, 23), _mm256_set1_epi32(0x00400000)));
  }
  const __m128i h = _mm_loadu_si128(
      reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.scales) + i));
  if (p.scale_kind == 1) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16
}

// Zero-point codes [i, i + count) of the packed stream (count <= 8), zero above: one 64-bit
// read holds eight codes of up to 7 bits from any bit offset (8-bit codes start on a byte).
inline __m256i zeros8(const Packed& p, int64_t i, int count) {
  const int64_t bit = i * p.bits;
  const uint8_t* src = p.qzeros + (bit >> 3);
  uint64_t w = 0;
  if (__builtin_expect(src + 8 <= p.zeros_end, 1)) {
    std::memcpy(&w, src, 8);
  } else {  // the stream's last bytes: never read past the tensor
    std::memcpy(&w, src, static_cast<size_t>(p.zeros_end - src));
  }
  w >>= bit & 7;
  const uint64_t mask = (uint64_t{1} << p.bits) - 1;
  alignas(32) int32_t z[8];
  for (int j = 0; j < 8; ++j) z[j] = j < count ? static_cast<int32_t>((w >> (j * p.bits)) & mask) : 0;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(z));
}

// All ones in lanes [0, count), zero above.
inline __m256i lane_mask(int count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Lane i = the sum of the eight int32 lanes of d[i].
inline __m256i reduce8(const int32_t d[8][8]) {
  auto ld = [&](int i) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(d[i])); };
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(ld(0), ld(1)), _mm256_hadd_epi32(ld(2), ld(3)));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(ld(4), ld(5)), _mm256_hadd_epi32(ld(6), ld(7)));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// MT activation rows against weight rows [n0, n1): integer dots over [0, ksuper), the fp32
// per-8 path over the rest (x: (MT, Kp) fp32; xrest: (MT, G) sums of x over the rest).
//
// Each chunk's dot stays an int32 vector until eight chunks are done; then one horizontal
// reduction, the integer zero-point correction (sum (c - z) q = sum c q - z sum q, exact), one
// convert and one FMA against the eight chunks' weight and activation scales. Per-chunk scalar
// work would cost as much as the block's own multiply-adds.
//
// Dots<B> is the instruction set's inner loop: perm(t) its lane order (QuantActs::build lays
// out x to match) and chunk<MT>(...) the int32 dots of one chunk, written to dots[m][i].
template <int B, int MT, typename Dots>
void gemv_tile_wide(const Packed& p, const QuantActs& a, int64_t m0, const float* x, int64_t Kp,
                    const float* xrest, float* out, int64_t out_stride, int64_t n0, int64_t n1) {
  const Dots dots_kernel;
  const Decoder<B> dec;
  const int32_t zsym = 1 << (B - 1);
  alignas(32) int32_t dots[MT][8][8];
  alignas(32) float ws[8];
  alignas(32) int32_t zs[8];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qweight + n * p.row_bytes;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t cb = 0; cb < a.chunks; cb += 8) {
      const int cn = static_cast<int>(std::min<int64_t>(8, a.chunks - cb));
      for (int i = 0; i < cn; ++i) {
        const int64_t k0 = (cb + i) * a.chunk, k1 = std::min(k0 + a.chunk, a.ksuper);
        dots_kernel.template chunk<MT>(row, a.q.data() + m0 * a.ksuper, a.ksuper, k0, k1, dots, i);
      }
      for (int i = cn; i < 8; ++i)
        for (int m = 0; m < MT; ++m)
          _mm256_store_si256(reinterpret_cast<__m256i*>(dots[m][i]), _mm256_setzero_si256());
      // the eight chunks' weight scales and zero points (padding lanes: zero)
      __m256 wsv;
      __m256i zv = _mm256_set1_epi32(zsym);
      if (p.groups == 1) {
        wsv = _mm256_set1_ps(p.scale(n, 0));
        if (p.qzeros != nullptr) zv = _mm256_set1_epi32(static_cast<int32_t>(p.zero(n, 0)));
      } else {
        const int64_t g0 = cb / a.per_group;  // one division per eight chunks
        if (a.per_group == 1 && (n * p.groups + cb + 8 <= p.N * p.groups)) {
          // eight consecutive scales, read within the tensor; lanes past the row are masked
          wsv = _mm256_and_ps(scales8(p, n, cb), _mm256_castsi256_ps(lane_mask(cn)));
        } else {
          for (int i = 0; i < 8; ++i)
            ws[i] = i < cn ? p.scale(n, g0 + (cb % a.per_group + i) / a.per_group) : 0.f;
          wsv = _mm256_load_ps(ws);
        }
        if (p.qzeros != nullptr) {
          if (a.per_group == 1) {
            zv = zeros8(p, n * p.groups + cb, cn);
          } else {
            for (int i = 0; i < 8; ++i) {
              const int64_t g = g0 + (cb % a.per_group + i) / a.per_group;
              zs[i] = i < cn ? static_cast<int32_t>(p.zero(n, g)) : 0;
            }
            zv = _mm256_load_si256(reinterpret_cast<const __m256i*>(zs));
          }
        }
      }
      for (int m = 0; m < MT; ++m) {
        const int64_t at = (m0 + m) * a.padded + cb;
        const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qsum.data() + at));
        const __m256i d = _mm256_sub_epi32(reduce8(dots[m]), _mm256_mullo_epi32(zv, qs));
        const __m256 f = _mm256_mul_ps(wsv, _mm256_loadu_ps(a.scale.data() + at));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), f, acc[m]);
      }
    }
    float tail[MT] = {};
    if (a.ksuper < p.K) {  // codes past the last whole 64-code block (per-channel only)
      __m256 ga[MT];
      for (int m = 0; m < MT; ++m) ga[m] = _mm256_setzero_ps();
      for (int64_t k = a.ksuper; k < p.K; k += 8) {
        const __m256 w = _mm256_cvtepi32_ps(dec(row + (k >> 3) * B, p.end));
        for (int m = 0; m < MT; ++m) ga[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * Kp + k), ga[m]);
      }
      const float s = p.scale(n, 0), z = p.zero(n, 0);
      for (int m = 0; m < MT; ++m) tail[m] = s * (hsum(ga[m]) - z * xrest[m * p.groups]);
    }
    for (int m = 0; m < MT; ++m) out[m * out_stride + n] = hsum(acc[m]) + tail[m];
  }
}

template <int B, typename Dots>
void gemv_run_wide(const Packed& p, const QuantActs& a, const float* x, int64_t M, int64_t Kp,
                   const float* xrest, float* out) {
  over_tiles(p, M, [&](auto mt, int64_t m, int64_t n0, int64_t n1) {
    gemv_tile_wide<B, decltype(mt)::value, Dots>(p, a, m, x + m * Kp, Kp, xrest + m * p.groups,
                                                 out + m * p.N, p.N, n0, n1);
  });
}

// The AVX2 inner loop: four vectors of sixteen int16 codes per 64-code block, one vpmaddwd
// each, summed as a tree so the loop-carried chain is one add per block.
template <int B>
struct Avx2Dots {
  const Wide<B> wide;

  static int perm(int t) { return wide_perm(B, t / 16, t % 16); }

  template <int MT>
  inline void chunk(const uint8_t* row, const int16_t* q0, int64_t q_stride, int64_t k0,
                    int64_t k1, int32_t dots[][8][8], int i) const {
    __m256i dot[MT];
    for (int m = 0; m < MT; ++m) dot[m] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 64) {
      __m256i codes[4];
      wide.decode(row + (k >> 3) * B, codes);
      for (int m = 0; m < MT; ++m) {
        const int16_t* q = q0 + m * q_stride + k;
        __m256i t[4];
        for (int v = 0; v < 4; ++v) {
          t[v] = _mm256_madd_epi16(
              codes[v], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 16 * v)));
        }
        dot[m] = _mm256_add_epi32(
            dot[m], _mm256_add_epi32(_mm256_add_epi32(t[0], t[1]), _mm256_add_epi32(t[2], t[3])));
      }
    }
    for (int m = 0; m < MT; ++m) _mm256_store_si256(reinterpret_cast<__m256i*>(dots[m][i]), dot[m]);
  }
};

// The lane order of a Dots kernel as QuantActs::build wants it.
template <typename Dots>
void lane_order(int8_t perm[64]) {
  for (int t = 0; t < 64; ++t) perm[t] = static_cast<int8_t>(Dots::perm(t));
}

// int16 activations over the whole 64-code blocks; false (nothing written) when the format has
// no such blocks or x is not finite. Dots<B>: the instruction set's inner loop.
template <template <int> class Dots>
bool gemv_int16(const Packed& p, const float* xs, int64_t M, int64_t K, float* o) {
  const int64_t ksuper = has_wide(p.bits) && blocks_fit(p) ? K / 64 * 64 : 0;
  if (ksuper == 0) return false;
  int8_t perm[64];
  switch (p.bits) {
    case 2: lane_order<Dots<2>>(perm); break;
    case 3: lane_order<Dots<3>>(perm); break;
    case 4: lane_order<Dots<4>>(perm); break;
    case 5: lane_order<Dots<5>>(perm); break;
    case 6: lane_order<Dots<6>>(perm); break;
    default: lane_order<Dots<8>>(perm); break;
  }
  QuantActs a;
  if (!a.build(p, xs, M, K, ksuper, perm)) return false;
  // The fp32 tail past ksuper (per-channel only, K % 64 != 0) reads x zero-padded, in natural
  // order, and its sum; without a tail neither is built.
  const bool tail = ksuper < K;
  const int64_t Kp = tail ? (K + 7) / 8 * 8 : 0;
  std::vector<float> xpad(static_cast<size_t>(M * Kp), 0.f);
  std::vector<float> xrest(static_cast<size_t>(M * p.groups), 0.f);
  for (int64_t m = 0; tail && m < M; ++m) {
    std::memcpy(xpad.data() + m * Kp, xs + m * K, sizeof(float) * static_cast<size_t>(K));
    for (int64_t k = ksuper; k < K; ++k) xrest[m * p.groups] += xs[m * K + k];
  }
  switch (p.bits) {
    case 2: gemv_run_wide<2, Dots<2>>(p, a, xpad.data(), M, Kp, xrest.data(), o); break;
    case 3: gemv_run_wide<3, Dots<3>>(p, a, xpad.data(), M, Kp, xrest.data(), o); break;
    case 4: gemv_run_wide<4, Dots<4>>(p, a, xpad.data(), M, Kp, xrest.data(), o); break;
    case 5: gemv_run_wide<5, Dots<5>>(p, a, xpad.data(), M, Kp, xrest.data(), o); break;
    case 6: gemv_run_wide<6, Dots<6>>(p, a, xpad.data(), M, Kp, xrest.data(), o); break;
    default: gemv_run_wide<8, Dots<8>>(p, a, xpad.data(), M, Kp, xrest.data(), o); break;
  }
  return true;
}

#endif  // COMPRESS_AVX2

}  // namespace
