// Our own bf16 GEMMs for prefill (part of the qmatmul translation unit; see qmatmul.cpp).
//
// Prefill through torch's bf16 matmul pays, on every call, for the weight it is handed: oneDNN
// reorders a plain (N, K) bf16 weight into its blocked layout before its kernel runs, and a
// dequantized tile adds our own pass on top. Here a panel of weight rows is dequantized once
// (lookup tables, qmatmul_avx512.cpp) straight into 16-row x 32-input blocks, and multiplied
// with every activation row while it sits in the L2 cache. Two engines share that machinery:
//
// - AMX (the amx build): tiles C0..C3 fp32 accumulators, A0/A1 weights (16 output features x 32
//   inputs, bf16), B0/B1 activations (16 input pairs x 16 tokens x 2, the VNNI layout
//   TDPBF16PS wants; x is packed into it once per call).
// - AVX512-BF16 (the avx512 build on a CPU that has it, Zen 4 and Cooper Lake: chosen at run
//   time, compiled with a function target): sixteen zmm accumulators, one per weight row of a
//   16-row block, lanes = 16 tokens; each input pair of the activations (one zmm of the same
//   VNNI blocks) meets the sixteen rows' pairs broadcast from the panel, VDPBF16PS. At 32 rows
//   of 4096^2 int4 on one Zen 4 core: 5.87 ms, dequantization included, against 7.07 ms for
//   torch's bf16 matmul, whose weight reorder does not pay off on so few rows
//   (benchmarks/kernels_zen4.md).
//
// Either way C[n][m] = sum_k W[n][k] x[m][k], so the weight needs no transpose; the 16x16
// result blocks are transposed on their way out (cheaper: there are K times fewer outputs than
// weights).
#ifdef COMPRESS_AVX512

#if defined(COMPRESS_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// 16x16 32-bit transpose in registers: r[i] row i in, column i out.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // rows now hold 4x4 blocks transposed inside each 128-bit lane; move the lanes
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// x (M, K) bf16 -> VNNI blocks: block (mb, kb) is 16 rows r x 16 tokens m x 2, holding
// x[16 mb + m][32 kb + 2 r + e]; zero past M and K.
void pack_acts(const uint16_t* x, int64_t M, int64_t K, int64_t KB, uint16_t* xp) {
  const int64_t MB = (M + 15) / 16;
  at::parallel_for(0, MB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t mb = b0; mb < b1; ++mb) {
      for (int64_t kb = 0; kb < KB; ++kb) {
        const int64_t k0 = 32 * kb;
        const int64_t kn = std::min<int64_t>(32, K - k0);
        const __mmask32 kmask =
            kn >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << kn) - 1);
        __m512i r[16];
        for (int m = 0; m < 16; ++m) {
          const int64_t row = 16 * mb + m;
          r[m] = row < M ? _mm512_maskz_loadu_epi16(kmask, x + row * K + k0) : _mm512_setzero_si512();
        }
        transpose16(r);
        uint16_t* dst = xp + (mb * KB + kb) * 512;
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + 32 * i, r[i]);
      }
    }
  });
}

// One 16x16 C block (row n - n0, column m - m0) -> out rows (bf16) plus the bias; only m < M
// and n < N are written.
// (_mm512_cvtneps_pbh is AVX512-BF16: compiled for it, called only where the CPU has it.)
__attribute__((target("avx512bf16"))) void store_block(const float* c, int64_t n0, int64_t m0,
                                                        int64_t M, int64_t N, const float* bias,
                                                        uint16_t* out) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + 16 * i);
  transpose16(r);  // row i: token m0 + i, features n0 .. n0 + 15
  const int64_t nn = std::min<int64_t>(16, N - n0);
  const __mmask16 nmask = nn >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << nn) - 1);
  const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(nmask, bias + n0) : _mm512_setzero_ps();
  for (int i = 0; i < 16 && m0 + i < M; ++i) {
    const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[i]), b);
    _mm256_mask_storeu_epi16(out + (m0 + i) * N + n0, nmask, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

using TilesFn = void (*)(const Packed&, int64_t, int64_t, uint16_t*, int64_t);

TilesFn tiles_fn(int bits) {
  switch (bits) {
    case 2: return dequant_tiles_avx512_bf16<2>;
    case 3: return dequant_tiles_avx512_bf16<3>;
    case 4: return dequant_tiles_avx512_bf16<4>;
    case 5: return dequant_tiles_avx512_bf16<5>;
    case 6: return dequant_tiles_avx512_bf16<6>;
    case 7: return dequant_tiles_avx512_bf16<7>;
    default: return dequant_tiles_avx512_bf16<8>;
  }
}

// Grow-only scratch of the calling thread: a fresh buffer of a few hundred KiB per call is an
// mmap, its page faults and a memset every time (measured: half the cost of packing x).
uint16_t* scratch(int slot, size_t count) {
  thread_local std::vector<uint16_t> buffers[2];  // 0: packed activations, 1: a weight panel
  std::vector<uint16_t>& b = buffers[slot];
  if (b.size() < count) b.resize(count);
  return b.data();
}

// Whether the panel GEMMs take this format: whole 32-input blocks inside a group.
bool panel_ok(const Packed& p) { return p.groups == 1 || p.group % 32 == 0; }

// Rows per panel: at most `max_rows`, a multiple of `align`, and as many panels as make whole
// rounds of the threads where the rows allow (SmolLM2's 576 rows on two cores: six panels of
// 96 for AMX, not three and two of 128; twelve of 48 for AVX512-BF16, not five and four of 64,
// which left one core a ninth of the work idle, 0.90x bf16 against 1.0x).
int64_t panel_rows_for(int64_t N, int64_t max_rows, int64_t align, int64_t threads) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  int64_t panels = ceil_div(ceil_div(N, max_rows), threads) * threads;
  for (;;) {
    const int64_t rows = ceil_div(ceil_div(N, panels), align) * align;
    if (ceil_div(N, rows) % threads == 0 || rows == align) return rows;
    panels += threads;
  }
}

// x (M, K) bf16 contiguous -> (M, N) bf16 (+ bias, fp32 or null) by panels of weight rows
// (panel_rows_for). Each thread calls enter() once, multiply(panel, rows, x blocks, KB, n0)
// per panel (rows: a multiple of `align`, zero past N), then leave().
template <typename Enter, typename Multiply, typename Leave>
void panel_gemm_run(const Packed& p, const uint16_t* x, int64_t M, int64_t max_rows,
                    int64_t align, const Enter& enter, const Multiply& multiply,
                    const Leave& leave) {
  const int64_t KB = (p.K + 31) / 32, tail = p.K % 32;
  uint16_t* xp = scratch(0, static_cast<size_t>((M + 15) / 16 * KB * 512));
  pack_acts(x, M, p.K, KB, xp);
  const TilesFn dequant = tiles_fn(p.bits);
  const int64_t panel_rows = panel_rows_for(p.N, max_rows, align, at::get_num_threads());
  const int64_t panels = (p.N + panel_rows - 1) / panel_rows;
  at::parallel_for(0, panels, 1, [&](int64_t q0, int64_t q1) {
    uint16_t* w = scratch(1, static_cast<size_t>(panel_rows * KB * 32));
    enter();
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = q * panel_rows, n1 = std::min(p.N, n0 + panel_rows);
      const int64_t rows = (n1 - n0 + align - 1) / align * align;
      dequant(p, n0, n1, w, KB);
      for (int64_t r = 0; r < rows; ++r) {
        uint16_t* row = w + r / 16 * KB * 512 + r % 16 * 32;
        if (r >= n1 - n0) {  // padding rows (the last panel only)
          for (int64_t kb = 0; kb < KB; ++kb) std::memset(row + 512 * kb, 0, 64);
        } else if (tail != 0) {  // inputs past K in the last block (the scratch is reused)
          std::memset(row + 512 * (KB - 1) + tail, 0, sizeof(uint16_t) * (32 - tail));
        }
      }
      multiply(w, rows, xp, KB, n0);
    }
    leave();
  });
}

// ---- AVX512-BF16 (no AMX)

// Weight rows per panel: 64 x 4096 bf16 is 512 KiB, half of a Zen 4 core's L2, beside one
// 16-token block of x (128 KiB at 4096 inputs).
constexpr int64_t kDotPanelRows = 64;

// Whether this CPU executes VDPBF16PS (the avx512 build runs on CPUs with and without it).
bool bf16_dot_supported() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

// One panel (blocks as the AMX panel's, `rows` a multiple of 16) against all activation blocks:
// for each 16-token block, each 16-row weight block sums over K into sixteen accumulators (one
// a weight row, lanes = tokens) and leaves as one 16x16 C block.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dot_panel(
    const uint16_t* w, int64_t rows, const uint16_t* xp, int64_t KB, int64_t M, int64_t N,
    int64_t n_base, const float* bias, uint16_t* out) {
  const int64_t MB = (M + 15) / 16;
  alignas(64) float c[256];
  for (int64_t mb = 0; mb < MB; ++mb) {
    const uint16_t* xb = xp + mb * KB * 512;
    for (int64_t t = 0; t < rows / 16; ++t) {
      const int64_t n0 = n_base + 16 * t;
      if (n0 >= N) break;
      const uint16_t* wb = w + t * KB * 512;
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t kb = 0; kb < KB; ++kb) {
        const uint16_t* xk = xb + kb * 512;
        const uint16_t* wk = wb + kb * 512;
        for (int i = 0; i < 16; ++i) {  // input pair i of the block: one zmm of 16 tokens
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xk + 32 * i);
          for (int j = 0; j < 16; ++j) {
            int32_t pair;
            std::memcpy(&pair, wk + 32 * j + 2 * i, sizeof(pair));
            acc[j] = _mm512_dpbf16_ps(acc[j], xv, (__m512bh)_mm512_set1_epi32(pair));
          }
        }
      }
      for (int j = 0; j < 16; ++j) _mm512_store_ps(c + 16 * j, acc[j]);
      store_block(c, n0, 16 * mb, M, N, bias, out);
    }
  }
}

// x (M, K) bf16 contiguous -> (M, N) bf16 (+ bias, fp32 or null); false without AVX512-BF16.
bool dot_gemm(const Packed& p, const uint16_t* x, int64_t M, const float* bias, uint16_t* out) {
  if (!bf16_dot_supported()) return false;
  panel_gemm_run(
      p, x, M, kDotPanelRows, 16, [] {},
      [&](const uint16_t* w, int64_t rows, const uint16_t* xp, int64_t KB, int64_t n0) {
        dot_panel(w, rows, xp, KB, M, p.N, n0, bias, out);
      },
      [] {});
  return true;
}

#ifdef COMPRESS_AMX

// ---- AMX

// Weight rows dequantized per panel: 128 x 4096 bf16 is 1 MiB, which stays in L2 beside a pair
// of activation blocks. Larger panels spill L2; smaller ones stream x from L3 more often.
constexpr int64_t kPanelRows = 128;

// Linux grants a process the AMX tile state only on request.
bool amx_permitted() {
  static const bool ok = [] {
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};

// One panel of weight rows (tile blocks: block (t, kb) holds rows 16 t .. 16 t + 15, inputs
// 32 kb .. 32 kb + 31, 1 KiB contiguous; `rows` a multiple of 32, zero past N) against all
// activation blocks, two weight and two activation tiles at a time over the whole K (each
// loaded tile meets two others). Pairs of activation blocks outside, weight tiles inside: the
// pair (32 tokens x K) and the panel both stay in L2 while they meet; the other order streams
// all of x from L3 once per 32 weight rows.
//
// Tile loads that miss L1 wait on L2 unless asked for early: the weight tiles two blocks ahead
// are prefetched (measured on Sapphire Rapids, 4096^2 at 512 tokens, one core: 330 -> 440
// GMAC/s; parking the accumulators to keep activation tiles in L1 across weight tiles, and
// prefetching the activations as well, both measured slower).
void panel_gemm(const uint16_t* w, int64_t rows, const uint16_t* xp, int64_t KB, int64_t M,
                int64_t N, int64_t n_base, const float* bias, uint16_t* out) {
  constexpr int64_t kAhead = 2;
  const int64_t MB = (M + 15) / 16;
  alignas(64) float c[4][256];
  for (int64_t mb = 0; mb < MB; mb += 2) {
    const bool two = mb + 1 < MB;
    const uint16_t* x0 = xp + mb * KB * 512;
    const uint16_t* x1 = x0 + KB * 512;
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const uint16_t* w0 = w + r0 / 16 * KB * 512;
      const uint16_t* w1 = w0 + KB * 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < KB; ++kb) {
        if (kb + kAhead < KB) {
          const char* p0 = reinterpret_cast<const char*>(w0 + 512 * (kb + kAhead));
          const char* p1 = reinterpret_cast<const char*>(w1 + 512 * (kb + kAhead));
          for (int line = 0; line < 1024; line += 64) {
            _mm_prefetch(p0 + line, _MM_HINT_T0);
            _mm_prefetch(p1 + line, _MM_HINT_T0);
          }
        }
        _tile_loadd(4, w0 + 512 * kb, 64);
        _tile_loadd(5, w1 + 512 * kb, 64);
        _tile_loadd(6, x0 + 512 * kb, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (two) {
          _tile_loadd(7, x1 + 512 * kb, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(2, c[2], 64);
      if (two) {
        _tile_stored(1, c[1], 64);
        _tile_stored(3, c[3], 64);
      }
      for (int h = 0; h < 2; ++h) {  // weight tiles A0, A1
        const int64_t n0 = n_base + r0 + 16 * h;
        if (n0 >= N) break;
        store_block(c[2 * h], n0, 16 * mb, M, N, bias, out);
        if (two) store_block(c[2 * h + 1], n0, 16 * (mb + 1), M, N, bias, out);
      }
    }
  }
}

// x (M, K) bf16 contiguous -> (M, N) bf16 (+ bias, fp32 or null); false when AMX is refused.
bool amx_gemm(const Packed& p, const uint16_t* x, int64_t M, const float* bias, uint16_t* out) {
  if (!amx_permitted()) return false;
  panel_gemm_run(
      p, x, M, kPanelRows, 32,
      [] {
        TileConfig cfg;
        _tile_loadconfig(&cfg);
      },
      [&](const uint16_t* w, int64_t rows, const uint16_t* xp, int64_t KB, int64_t n0) {
        panel_gemm(w, rows, xp, KB, M, p.N, n0, bias, out);
      },
      [] { _tile_release(); });
  return true;
}

#endif  // COMPRESS_AMX

}  // namespace

#endif  // COMPRESS_AVX512
