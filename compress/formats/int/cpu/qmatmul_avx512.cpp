// AVX-512 kernels (part of the qmatmul translation unit; see qmatmul.cpp): the int16-activation
// GEMV with VNNI, and dequantization to bf16 through per-group lookup tables.
#ifdef COMPRESS_AVX512

namespace {

// ---- GEMV: 64 codes -> two vectors of 32 int16 codes, one vpdpwssd each
//
// vpdpwssd fuses the 32 multiplies and pair adds of vpmaddwd with the accumulation, so a
// 64-code block costs two dot instructions where AVX2 needs four multiply-adds and three adds;
// 4- and 2-bit codes also unpack in fewer instructions at 512 bits. Lane order (perm): 8-bit
// natural; 4-bit lane j of vector u holds code 2j+u; 2-bit code 4(j%16) + 2(j/16) + u; 3, 5 and
// 6 bits reuse the AVX2 unpack (two 256-bit halves per vector).
template <int B>
struct Avx512Dots {
  const Wide<B> wide;  // 3, 5 and 6 bits
  const __m512i m4 = _mm512_set1_epi16(0x0f), m2 = _mm512_set1_epi16(0x03);

  static int perm(int t) {
    const int u = t / 32, j = t % 32;
    if (B == 8) return t;
    if (B == 4) return 2 * j + u;
    if (B == 2) return 4 * (j % 16) + 2 * (j / 16) + u;
    return wide_perm(B, 2 * u + j / 16, j % 16);
  }

  // Reads exactly the 8 * B bytes of the block.
  inline void decode(const uint8_t* src, __m512i out[2]) const {
    if (B == 8) {
      out[0] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      out[1] =
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32)));
    } else if (B == 4) {  // word j = byte j = codes 2j, 2j+1
      const __m512i w =
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      out[0] = _mm512_and_si512(w, m4);
      out[1] = _mm512_srli_epi16(w, 4);
    } else if (B == 2) {  // words 0-15: byte j; words 16-31: byte j >> 4
      const __m256i y = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(y), _mm256_srli_epi16(y, 4), 1);
      out[0] = _mm512_and_si512(w, m2);
      out[1] = _mm512_and_si512(_mm512_srli_epi16(w, 2), m2);
    } else {
      __m256i v[4];
      wide.decode(src, v);
      out[0] = _mm512_inserti64x4(_mm512_castsi256_si512(v[0]), v[1], 1);
      out[1] = _mm512_inserti64x4(_mm512_castsi256_si512(v[2]), v[3], 1);
    }
  }

  template <int MT>
  inline void chunk(const uint8_t* row, const int16_t* q0, int64_t q_stride, int64_t k0,
                    int64_t k1, int32_t dots[][8][8], int i) const {
    // two accumulators per row: the loop-carried chain is one vpdpwssd per block
    __m512i d0[MT], d1[MT];
    for (int m = 0; m < MT; ++m) d0[m] = d1[m] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 64) {
      __m512i codes[2];
      decode(row + (k >> 3) * B, codes);
      for (int m = 0; m < MT; ++m) {
        const int16_t* q = q0 + m * q_stride + k;
        d0[m] = _mm512_dpwssd_epi32(d0[m], codes[0], _mm512_loadu_si512(q));
        d1[m] = _mm512_dpwssd_epi32(d1[m], codes[1], _mm512_loadu_si512(q + 32));
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m512i s = _mm512_add_epi32(d0[m], d1[m]);
      const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
      _mm256_store_si256(reinterpret_cast<__m256i*>(dots[m][i]), h);
    }
  }
};

// ---- dequantization to bf16
//
// For B <= 6 a group has at most 64 distinct weights: a table of bf16((c - z) * s), computed in
// fp32 exactly as the reference does, maps codes to weights with one vpermw (vpermi2w for 6
// bits) per 32 codes, bit-exact. 7- and 8-bit codes convert arithmetically, 16 at a time.

// 16 fp32 -> 16 bf16, round to nearest even (finite inputs).
inline __m256i bf16x16(__m512 w) {
  const __m512i u = _mm512_castps_si512(w);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  return _mm512_cvtepi32_epi16(r);
}

// 32 fp32 (a: the first 16) -> 32 bf16, round to nearest even: one instruction with AVX512-BF16
// (the AMX build; int8 dequantization 5.9 -> 8.5 Gel/s), else two bf16x16.
inline __m512i bf16x32(__m512 a, __m512 b) {
#ifdef __AVX512BF16__
  return (__m512i)_mm512_cvtne2ps_pbh(b, a);
#else
  return _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16(a)), bf16x16(b), 1);
#endif
}

// Reads [src, src + 16) but never at or past end (those bytes read as zero).
inline __m128i load16(const uint8_t* src, const uint8_t* end) {
  if (__builtin_expect(src + 16 <= end, 1)) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const int64_t n = end - src;
  const __mmask16 mask = n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
  return _mm_maskz_loadu_epi8(mask, src);
}

inline __m256i load32(const uint8_t* src, const uint8_t* end) {
  if (__builtin_expect(src + 32 <= end, 1)) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const int64_t n = end - src;
  const __mmask32 mask = n <= 0 ? 0 : static_cast<__mmask32>((uint64_t{1} << n) - 1);
  return _mm256_maskz_loadu_epi8(mask, src);
}

template <int B>
struct Bf16Rows {
  static constexpr bool kTable = B <= 6;
  __m512i gather, ctrl, shift, mask, even, odd;

  Bf16Rows() {
    // 32 codes from a byte boundary, 4B bytes: one 32-byte load, then one vpermw gives 128-bit
    // lane L the words from byte 2 floor(L B / 2) on (codes 8L .. 8L + 7 start at bit 8 L B),
    // and word j of the lane takes the two bytes holding code 8L + j, shifted down. (Four
    // 16-byte loads and three inserts did the same with twice the shuffle-port work.)
    alignas(64) int16_t gw[32];
    alignas(64) int8_t c[64];
    alignas(64) int16_t s[32];
    for (int L = 0; L < 4; ++L) {
      const int first = L * B / 2, odd_start = (L * B) % 2;
      for (int w = 0; w < 8; ++w) gw[8 * L + w] = static_cast<int16_t>(std::min(first + w, 15));
      for (int j = 0; j < 8; ++j) {
        const int bit = j * B;
        c[16 * L + 2 * j] = static_cast<int8_t>(odd_start + bit / 8);
        c[16 * L + 2 * j + 1] = static_cast<int8_t>(odd_start + bit / 8 + 1);
        s[8 * L + j] = static_cast<int16_t>(bit % 8);
      }
    }
    gather = _mm512_load_si512(gw);
    ctrl = _mm512_load_si512(c);
    shift = _mm512_load_si512(s);
    mask = _mm512_set1_epi16(static_cast<int16_t>((1 << B) - 1));
    // 4-bit interleave: codes 2j (low nibbles) and 2j+1 (high nibbles) back into order
    alignas(64) int16_t e[32], o[32];
    for (int j = 0; j < 16; ++j) {
      e[2 * j] = static_cast<int16_t>(j);
      e[2 * j + 1] = static_cast<int16_t>(32 + j);
      o[2 * j] = static_cast<int16_t>(16 + j);
      o[2 * j + 1] = static_cast<int16_t>(48 + j);
    }
    even = _mm512_load_si512(e);
    odd = _mm512_load_si512(o);
  }

  // 32 codes of B <= 7 bits starting at a byte boundary -> 32 words, in order.
  inline __m512i codes32(const uint8_t* src, const uint8_t* end) const {
    const __m512i v = _mm512_permutexvar_epi16(gather, _mm512_castsi256_si512(load32(src, end)));
    return _mm512_and_si512(_mm512_srlv_epi16(_mm512_shuffle_epi8(v, ctrl), shift), mask);
  }

  // bf16((c - z) * s) for c = 0..63 (tables: lo = 0..31, hi = 32..63).
  static inline void tables(float s, float z, __m512i& lo, __m512i& hi) {
    const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    auto part = [&](float base) {
      return _mm512_mul_ps(_mm512_sub_ps(_mm512_add_ps(iota, _mm512_set1_ps(base)), zv), sv);
    };
    if (B <= 4) {
      lo = _mm512_castsi256_si512(bf16x16(part(0.f)));
    } else {
      lo = bf16x32(part(0.f), part(16.f));
    }
    hi = B == 6 ? bf16x32(part(32.f), part(48.f)) : lo;
  }

  // Row n of W as bf16: input k to dst[(k / 32) * bs + k % 32] (bs = 32: a plain row; the AMX
  // GEMM passes its tile blocks' stride and gets its layout without a second pass).
  void row(const Packed& p, int64_t n, uint16_t* dst, int64_t bs = 32) const {
    const uint8_t* src = p.qweight + n * p.row_bytes;
    // The next row is prefetched as this one is read, a line per step: the rows come from
    // memory, and without it the loop waits on each (AMX GEMM, 4096^2 at 32 tokens, one core,
    // ms without / with: int4 4.25 / 3.05, int6 4.64 / 3.36, int8 4.90 / 3.72; two rows ahead,
    // or whole rows at once, measured slower).
    const char* ahead = reinterpret_cast<const char*>(n + 1 < p.N ? src + p.row_bytes : src);
    const int64_t span = p.groups == 1 ? p.K : p.group;
    auto at = [&](int64_t k) { return dst + (k >> 5) * bs + (k & 31); };
    for (int64_t g = 0; g < p.groups; ++g) {
      const float s = p.scale(n, g), z = p.zero(n, g);
      int64_t k = g * p.group;
      const int64_t k1 = k + span;
      // 32-code steps must start where a 32-block of dst does
      const bool aligned = (k & 31) == 0;
      if (kTable) {
        __m512i lo, hi;
        tables(s, z, lo, hi);
        if (B == 4 && aligned) {
          for (; k + 64 <= k1; k += 64) {
            _mm_prefetch(ahead + k / 2, _MM_HINT_T0);
            const __m512i w = _mm512_cvtepu8_epi16(load32(src + k / 2, p.end));
            const __m512i a = _mm512_and_si512(w, mask), b = _mm512_srli_epi16(w, 4);
            _mm512_storeu_si512(at(k), _mm512_permutexvar_epi16(_mm512_permutex2var_epi16(a, even, b), lo));
            _mm512_storeu_si512(at(k + 32), _mm512_permutexvar_epi16(_mm512_permutex2var_epi16(a, odd, b), lo));
          }
        }
        for (; aligned && k + 32 <= k1; k += 32) {
          _mm_prefetch(ahead + k * B / 8, _MM_HINT_T0);
          const __m512i c = codes32(src + k * B / 8, p.end);
          const __m512i w = B == 6 ? _mm512_permutex2var_epi16(lo, c, hi) : _mm512_permutexvar_epi16(c, lo);
          _mm512_storeu_si512(at(k), w);
        }
      } else {
        const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
        for (; aligned && k + 32 <= k1; k += 32) {
          _mm_prefetch(ahead + k * B / 8, _MM_HINT_T0);
          __m512i lo32, hi32;
          if (B == 8) {
            lo32 = _mm512_cvtepu8_epi32(load16(src + k, p.end));
            hi32 = _mm512_cvtepu8_epi32(load16(src + k + 16, p.end));
          } else {
            const __m512i c = codes32(src + k * B / 8, p.end);
            lo32 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(c));
            hi32 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(c, 1));
          }
          const __m512 a = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(lo32), zv), sv);
          const __m512 b = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(hi32), zv), sv);
          _mm512_storeu_si512(at(k), bf16x32(a, b));
        }
      }
      for (; k < k1; ++k) *at(k) = bf16_bits((static_cast<float>(p.code(n, k)) - z) * s);
    }
  }
};

template <int B>
void dequant_rows_avx512_bf16(const Packed& p, int64_t n0, int64_t n1, uint16_t* out, int64_t ld) {
  const Bf16Rows<B> rows;
  for (int64_t n = n0; n < n1; ++n) rows.row(p, n, out + (n - n0) * ld);
}

// Rows [n0, n1) into AMX tile blocks: block (t, kb) of 16 rows x 32 inputs is 512 contiguous
// values at w + (t * KB + kb) * 512. Inputs past K are left alone (the caller keeps them zero).
template <int B>
void dequant_tiles_avx512_bf16(const Packed& p, int64_t n0, int64_t n1, uint16_t* w, int64_t KB) {
  const Bf16Rows<B> rows;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r = n - n0;
    rows.row(p, n, w + r / 16 * KB * 512 + r % 16 * 32, 512);
  }
}

}  // namespace

#endif  // COMPRESS_AVX512
