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

#include <cmath>
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

#ifdef FP4_AVX2
// ---- int16 activations (bf16/fp16 inputs): integer dot products
//
// Each row of x is rounded to int16 per chunk of 64 columns (scale = the chunk's largest
// magnitude / 32767: finer than half precision's own rounding but for elements far below the
// chunk's largest), and the table holds int16 values (E2M1 times 2, exact; other tables in
// steps of 1/4096 of their largest). One vpmaddwd multiplies 16 codes with 16 activations.
//
// A step decodes 32 bytes (64 codes, one activation chunk): their low and high nibbles index
// the table's low and high bytes (four vpshufb), and unpacking interleaves the bytes back into
// four vectors of int16 values, e0 e1 (even columns) and o0 o1 (odd). vpshufb and unpacking
// work within 128-bit lanes, so e0 holds the even columns 0-14 in its low lane and 32-46 in its
// high one; e1 16-30 | 48-62, o0 1-15 | 33-47, o1 17-31 | 49-63. QuantX lays x out to match.
// Then A = e0.x + o0.x holds the dots of columns 0-15 (low lane) and 32-47 (high), B those of
// 16-31 and 48-63: a sub-block of S = min(block, 64) columns lies in one lane of A or B (S=16),
// one lane of A + B (S=32) or all of it (S=64). The int32 lanes (at most 8 products of
// 4096 x 32767; S=16 sums its sub-blocks' 16 in integers, 2^31 - 65535 at worst) become fp32,
// and every eight sub-blocks a few horizontal adds leave their eight sums in one vector, in an
// order kSlots gives, scaled by one multiply and FMA against the weight and activation scales
// laid out in that order.

constexpr int kSlots[3][8] = {
    {0, 1, 4, 5, 2, 3, 6, 7},  // S=16: hadd(hadd(A1, B1), hadd(A2, B2)), two steps
    {0, 2, 4, 6, 1, 3, 5, 7},  // S=32: hadd(hadd(D1, D2), hadd(D3, D4)), D = A + B, four steps
    {0, 1, 2, 3, 4, 5, 6, 7},  // S=64: eight steps, each reduced whole
};

inline const int* slots_of(int64_t sub) { return kSlots[sub == 16 ? 0 : sub == 32 ? 1 : 2]; }

// Where column c of a 64-column step sits in the step's activations (e0 e1 o0 o1, 16 each).
inline int step_position(int c) {
  const int byte = c / 2, lane = byte / 16, within = byte % 16;
  const int vec = (c % 2) * 2 + within / 8;
  return vec * 16 + lane * 8 + within % 8;
}

struct QuantX {
  int64_t k_cols, chunks;
  std::vector<int16_t> q;     // (rows, k_cols), each 64-column step in step order
  std::vector<float> scale;   // (rows, chunks): x ~ q * scale over a chunk of 64 columns

  void build(const float* x, int64_t M, int64_t K) {
    k_cols = K;
    chunks = K / 64;
    q.assign(static_cast<size_t>(M * K), 0);
    scale.assign(static_cast<size_t>(M * chunks), 0.f);
    int pos[64];
    for (int c = 0; c < 64; ++c) pos[c] = step_position(c);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < chunks; ++c) {
        const float* src = x + m * K + c * 64;
        int16_t* dst = q.data() + m * K + c * 64;
        float amax = 0.f;
        for (int k = 0; k < 64; ++k) amax = std::max(amax, std::fabs(src[k]));
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        for (int k = 0; k < 64; ++k) dst[pos[k]] = static_cast<int16_t>(std::nearbyint(src[k] * inv));
        scale[m * chunks + c] = amax / 32767.f;
      }
    }
  }
};

// Lane i = the sum of the eight lanes of v[i].
inline __m256 reduce8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

constexpr int kScaleLut = 0, kScaleE8M0 = 1, kScaleE4M3 = 2;

// E8M0 exponent bytes (one a 32-bit lane) -> 2^(e - 127) as fp32, e = 0 included (0x00400000,
// a subnormal) and 255 as inf: the values of the format's lookup table, without its gather.
inline __m256 e8m0(__m256i e) {
  return _mm256_castsi256_ps(_mm256_max_epu32(_mm256_slli_epi32(e, 23), _mm256_set1_epi32(0x00400000)));
}

// Sixteen E4M3 (fn) bytes -> their fp32 values times 2^-8, which `times` (a power of two times
// the tensor scale) takes back in the same multiply, one rounding as the table's: the magnitude
// bits shifted into an fp16 land on the value times 2^-8, subnormals included (F16C converts
// them exactly), and 0x7F / 0xFF become fp16 NaN.
inline void e4m3_times16(__m128i codes, __m256 times, __m256* lo, __m256* hi) {
  const __m256i c = _mm256_cvtepu8_epi16(codes);
  const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi16(0x7F));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8);
  const __m256i half = _mm256_blendv_epi8(_mm256_or_si256(_mm256_slli_epi16(mag, 7), sign),
                                          _mm256_set1_epi16(0x7E00),
                                          _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F)));
  *lo = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(half)), times);
  *hi = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)), times);
}

// One weight row's E8M0 / E4M3 scale codes decoded once, sixteen at a time, into `ready` in
// kSlots order with zeros past the last sub-block (`padded`, whole octets; `ready` has room for
// `padded` rounded up to 16): the row loop's octets are then one load each. Decoding an octet in
// the loop instead cost NVFP4 a third of its time (blocks of 16: an octet every two steps).
// Each decoded half is an octet in natural order, permuted into kSlots order on its way out.
void decode_row_scales(const uint8_t* codes, int64_t subs, int64_t padded, int kind,
                       float multiplier, __m256i order, float* ready) {
  const __m256 times = _mm256_set1_ps(multiplier);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  alignas(16) uint8_t tail[16];
  for (int64_t u = 0; u < padded; u += 16) {
    const uint8_t* src = codes + u;
    const bool last = u + 16 > subs;
    if (last) {  // never read past the row
      std::memset(tail, 0, sizeof(tail));
      if (subs > u) std::memcpy(tail, codes + u, static_cast<size_t>(subs - u));
      src = tail;
    }
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    __m256 lo, hi;
    if (kind == kScaleE8M0) {
      lo = e8m0(_mm256_cvtepu8_epi32(c));
      hi = e8m0(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
    } else {
      e4m3_times16(c, times, &lo, &hi);
    }
    if (last) {  // zeros past the last sub-block (E8M0's code 0 is not zero)
      const __m256i left = _mm256_set1_epi32(static_cast<int>(subs - u));
      lo = _mm256_and_ps(lo, _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, iota)));
      hi = _mm256_and_ps(hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                 left, _mm256_add_epi32(iota, _mm256_set1_epi32(8)))));
    }
    _mm256_storeu_ps(ready + u, _mm256_permutevar8x32_ps(lo, order));
    _mm256_storeu_ps(ready + u + 8, _mm256_permutevar8x32_ps(hi, order));
  }
}

// A weight row's scales, read an octet of sub-blocks at a time in kSlots order: from `ready`
// (E8M0 / E4M3 codes decoded once a row by decode_row_scales), from the stored scales where a
// block is a sub-block (uint8 codes through the lookup table by one gather, or fp32), else
// from `filled` (one per sub-block, blocks of 128 and more).
struct RowScales {
  const float* ready;    // the row's scales in kSlots order, zeros past the last, or nullptr
  const uint8_t* codes;  // the row's uint8 scale codes read through lut, or nullptr
  const float* lut;      // their values (256)
  const float* floats;   // the row's fp32 scales, or nullptr
  const float* filled;   // one scale per sub-block in order, or nullptr
  int64_t subs;          // sub-blocks in the row
  __m256i order;         // kSlots as lanes

  inline float at(int64_t u) const { return filled ? filled[u] : floats[u]; }

  inline __m256 octet(int64_t slot0, const int* slots) const {
    if (ready != nullptr) return _mm256_loadu_ps(ready + slot0);
    const bool whole = slot0 + 8 <= subs;
    if (codes != nullptr && filled == nullptr) {
      if (whole) {
        const __m256i idx = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + slot0)));
        return _mm256_i32gather_ps(lut, _mm256_permutevar8x32_epi32(idx, order), 4);
      }
      alignas(32) float v[8];  // a last partial octet: never read past the row
      for (int t = 0; t < 8; ++t) {
        const int64_t u = slot0 + slots[t];
        v[t] = u < subs ? lut[codes[u]] : 0.f;
      }
      return _mm256_load_ps(v);
    }
    if (filled == nullptr && whole) {
      return _mm256_permutevar8x32_ps(_mm256_loadu_ps(floats + slot0), order);
    }
    alignas(32) float v[8];  // fp32 scales of a last partial octet, or `filled`
    for (int t = 0; t < 8; ++t) {
      const int64_t u = slot0 + slots[t];
      v[t] = u < subs ? at(u) : 0.f;
    }
    return _mm256_load_ps(v);
  }
};

// One weight row against M activation rows. xs: each activation row's scale per sub-block
// times the table's unit, in kSlots order per octet, zero past the last sub-block (stride
// `padded`).
template <int S, int M>
void row_int16(const QuantX& a, const uint8_t* q, const RowScales& ws, const float* xs,
               int64_t padded, __m256i table_lo, __m256i table_hi, float* out) {
  const int* slots = slots_of(S);
  constexpr int kSteps = S == 16 ? 2 : S == 32 ? 4 : 8;  // steps an octet of sub-blocks spans
  constexpr int kKept = S == 64 ? 8 : 4;  // vectors an octet leaves to reduce (S=32, 64)
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const int64_t K = a.k_cols;
  const int16_t* xq = a.q.data();
  __m256 kept[M][kKept];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < kKept; ++j) kept[m][j] = _mm256_setzero_ps();  // a partial octet's rest
  __m256i pairs[M][2];  // S=16: hadd(A, B) of an octet's two steps
  for (int m = 0; m < M; ++m) pairs[m][0] = pairs[m][1] = _mm256_setzero_si256();
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  int step = 0;
  int64_t slot0 = 0;
  auto flush = [&]() {
    const __m256 wv = ws.octet(slot0, slots);
    for (int m = 0; m < M; ++m) {
      __m256 sums;
      if constexpr (S == 64) {
        sums = reduce8(kept[m]);
      } else if constexpr (S == 16) {  // a partial octet's stale second half meets zero scales
        sums = _mm256_cvtepi32_ps(_mm256_hadd_epi32(pairs[m][0], pairs[m][1]));
      } else {
        sums = _mm256_hadd_ps(_mm256_hadd_ps(kept[m][0], kept[m][1]),
                              _mm256_hadd_ps(kept[m][2], kept[m][3]));
      }
      const __m256 f = _mm256_mul_ps(wv, _mm256_loadu_ps(xs + m * padded + slot0));
      acc[m] = _mm256_fmadd_ps(sums, f, acc[m]);
    }
    slot0 += 8;
    step = 0;
  };
  for (int64_t k = 0; k < K; k += 64) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (k >> 1)));
    const __m256i lo = _mm256_and_si256(bytes, nibble);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
    const __m256i elo = _mm256_shuffle_epi8(table_lo, lo), ehi = _mm256_shuffle_epi8(table_hi, lo);
    const __m256i olo = _mm256_shuffle_epi8(table_lo, hi), ohi = _mm256_shuffle_epi8(table_hi, hi);
    const __m256i e0 = _mm256_unpacklo_epi8(elo, ehi), e1 = _mm256_unpackhi_epi8(elo, ehi);
    const __m256i o0 = _mm256_unpacklo_epi8(olo, ohi), o1 = _mm256_unpackhi_epi8(olo, ohi);
    for (int m = 0; m < M; ++m) {
      const __m256i* xv = reinterpret_cast<const __m256i*>(xq + m * K + k);
      const __m256i A = _mm256_add_epi32(_mm256_madd_epi16(e0, _mm256_loadu_si256(xv)),
                                         _mm256_madd_epi16(o0, _mm256_loadu_si256(xv + 2)));
      const __m256i B = _mm256_add_epi32(_mm256_madd_epi16(e1, _mm256_loadu_si256(xv + 1)),
                                         _mm256_madd_epi16(o1, _mm256_loadu_si256(xv + 3)));
      if constexpr (S == 16) {  // integer pair sums first: at most 16 products, below 2^31
        pairs[m][step] = _mm256_hadd_epi32(A, B);
      } else {
        kept[m][step] = _mm256_cvtepi32_ps(_mm256_add_epi32(A, B));
      }
    }
    if (++step == kSteps) flush();
  }
  if (step > 0) flush();
  for (int m = 0; m < M; ++m) out[m] = hsum(acc[m]);
}

template <int S, int M>
void rows_int16(const QuantX& a, int64_t m_rows, const uint8_t* q, const RowScales& ws,
                const float* xs, int64_t padded, __m256i table_lo, __m256i table_hi,
                float* out) {
  if constexpr (M > 1) {
    if (m_rows < M)
      return rows_int16<S, M - 1>(a, m_rows, q, ws, xs, padded, table_lo, table_hi, out);
  }
  row_int16<S, M>(a, q, ws, xs, padded, table_lo, table_hi, out);
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

// The arguments both GEMVs take alike; returns whether the scales are uint8 codes. `what`
// names the caller, `lut_needed` whether uint8 scales must come with their 256-entry table.
static bool check_inputs(const torch::Tensor& x, const torch::Tensor& qweight,
                         const torch::Tensor& scales, const torch::Tensor& scale_lut,
                         const char* what, bool lut_needed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous (M, K) float32 tensor");
  TORCH_CHECK(x.size(0) <= kMaxRows, what, " takes at most ", kMaxRows, " rows");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous(), "qweight");
  const bool coded = scales.scalar_type() == torch::kUInt8;
  TORCH_CHECK((coded || scales.scalar_type() == torch::kFloat32) && scales.is_contiguous(),
              "scales must be contiguous float32 or uint8");
  TORCH_CHECK(!coded || !lut_needed ||
                  (scale_lut.scalar_type() == torch::kFloat32 && scale_lut.numel() == 256),
              "uint8 scales need a 256-entry float32 scale_lut");
  return coded;
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                   torch::Tensor scale_lut, torch::Tensor lut, int64_t block) {
  const bool coded = check_inputs(x, qweight, scales, scale_lut, "gemv", true);
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

bool int16_acts() {
#ifdef FP4_AVX2
  return true;
#else
  return false;
#endif
}

// x (M, K) float32 (bf16/fp16 values) rounded to int16 per 64 columns; lut16 (16,) int16 table
// values, lut_scale their unit (table value = lut16 * lut_scale). uint8 scales decode through
// scale_lut (scale_kind 0), or as E8M0 (1) or E4M3 times tensor_scale (2), which scale_lut holds
// too but costs a gather an octet. Needs K % 64 == 0 and blocks
// of 16, 32 or a multiple of 64 (the caller checks; see the section above).
torch::Tensor gemv_int16(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                         torch::Tensor scale_lut, int64_t scale_kind, double tensor_scale,
                         torch::Tensor lut16, double lut_scale, int64_t block) {
  // scale_kind 0 reads uint8 scales through scale_lut; 1 and 2 decode them in registers
  const bool coded = check_inputs(x, qweight, scales, scale_lut, "gemv_int16", scale_kind == 0);
  TORCH_CHECK(lut16.scalar_type() == torch::kInt16 && lut16.numel() == 16, "lut16");
  const int64_t m_rows = x.size(0), k_cols = x.size(1), n_rows = qweight.size(0);
  const int64_t groups = scales.size(1);
  TORCH_CHECK(scale_kind >= 0 && scale_kind <= 2, "scale_kind must be 0, 1 or 2");
  TORCH_CHECK(scale_kind == 0 || block <= 64, "E8M0 / E4M3 scales come in blocks of 16 or 32");
  TORCH_CHECK(k_cols % 64 == 0 && qweight.size(1) == k_cols / 2, "K must be a multiple of 64");
  TORCH_CHECK(block == 16 || block == 32 || (block > 0 && block % 64 == 0),
              "blocks of 16, 32 or a multiple of 64");
  TORCH_CHECK(groups == (k_cols + block - 1) / block, "scales do not match");
  auto result = torch::empty({n_rows, m_rows}, x.options());
#ifdef FP4_AVX2
  const int64_t sub = std::min<int64_t>(block, 64);
  const int64_t subs = k_cols / sub, per_block = block / sub;
  const int64_t padded = (subs + 7) / 8 * 8;
  const int* slots = slots_of(sub);
  // slot t of octet o holds sub-block 8 o + slots[t] (none past the last: zero scales)
  std::vector<int64_t> sub_of(static_cast<size_t>(padded));
  for (int64_t t = 0; t < padded; ++t) sub_of[t] = (t & ~int64_t{7}) + slots[t & 7];
  QuantX a;
  a.build(x.data_ptr<float>(), m_rows, k_cols);
  const float unit = static_cast<float>(lut_scale);
  std::vector<float> xs(static_cast<size_t>(m_rows * padded), 0.f);  // activation scale x unit
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t t = 0; t < padded; ++t) {
      const int64_t u = sub_of[t];
      if (u < subs) xs[m * padded + t] = a.scale[m * a.chunks + u * sub / 64] * unit;
    }
  }
  alignas(16) uint8_t lo_bytes[16], hi_bytes[16];
  const int16_t* lp = lut16.data_ptr<int16_t>();
  for (int i = 0; i < 16; ++i) {
    const auto v = static_cast<uint16_t>(lp[i]);
    lo_bytes[i] = static_cast<uint8_t>(v & 0xFF);
    hi_bytes[i] = static_cast<uint8_t>(v >> 8);
  }
  const __m256i table_lo =
      _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo_bytes)));
  const __m256i table_hi =
      _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi_bytes)));
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float* sp = coded ? nullptr : scales.data_ptr<float>();
  const uint8_t* cp = coded ? scales.data_ptr<uint8_t>() : nullptr;
  const float* dp = coded && scale_kind == 0 ? scale_lut.data_ptr<float>() : nullptr;
  float* op = result.data_ptr<float>();
  const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(slots));
  const int kind = static_cast<int>(scale_kind);
  const float multiplier = 256.f * static_cast<float>(tensor_scale);  // exact: a power of two
  const bool decoded = coded && kind != kScaleLut;  // blocks of 16 or 32: per_block == 1
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> filled(per_block > 1 ? static_cast<size_t>(subs) : 0);
    std::vector<float> ready(decoded ? static_cast<size_t>((padded + 15) / 16 * 16) : 0);
    for (int64_t n = begin; n < end; ++n) {
      RowScales ws{nullptr, coded ? cp + n * groups : nullptr, dp,
                   coded ? nullptr : sp + n * groups, nullptr, subs, order};
      if (decoded) {
        decode_row_scales(cp + n * groups, subs, padded, kind, multiplier, order, ready.data());
        ws.ready = ready.data();
      }
      if (per_block > 1) {  // blocks of 128 and more: sub-blocks of 64, no division each
        for (int64_t g = 0, u = 0; g < groups; ++g) {
          const float v = coded ? dp[cp[n * groups + g]] : sp[n * groups + g];
          for (int64_t j = 0; j < per_block && u < subs; ++j) filled[u++] = v;
        }
        ws.filled = filled.data();
      }
      const uint8_t* qn = qp + n * (k_cols / 2);
      float* on = op + n * m_rows;
      if (sub == 16) {
        rows_int16<16, kMaxRows>(a, m_rows, qn, ws, xs.data(), padded, table_lo, table_hi, on);
      } else if (sub == 32) {
        rows_int16<32, kMaxRows>(a, m_rows, qn, ws, xs.data(), padded, table_lo, table_hi, on);
      } else {
        rows_int16<64, kMaxRows>(a, m_rows, qn, ws, xs.data(), padded, table_lo, table_hi, on);
      }
    }
  });
#else
  TORCH_CHECK(false, "gemv_int16 needs the AVX2 build");
#endif
  return result.t().contiguous();  // (N, M) -> (M, N)
}
