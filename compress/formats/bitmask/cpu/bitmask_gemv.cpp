// Fused GEMV over a bitmask sparse weight: each row's bitmask is walked and only its kept
// values are read, each times the activation at its column; never a dense weight.
//
// bitmask (N, ceil(K/8)) uint8, bit j of byte i set where column 8i + j holds a value (least
// significant bit first); values (N, KEPT) bfloat16 / float16 / float32, each row's values in
// column order (zero-padded past its last set bit); x (R, K) float32. Returns (R, N) float32:
//
//     y[r, o] = sum over set bits k of row o: values[o, rank(k)] * x[r, k]
//
// Values are widened to fp32 exactly; products and sums are fp32, so only the order of the
// additions differs from the reference kernel.
//
// The AVX2 path (also what an AVX-512 build runs) takes 8 columns a step: their mask byte b
// picks a permutation that moves the next popcount(b) values into the lanes of the set bits
// (one table entry: the lane's rank, its sign bit set where the bit is clear, so one blend
// zeroes those lanes), and the step costs one FMA per activation row against the 8
// activations as they lie. Mask bytes are read 8 at a time and all-zero bytes skipped. The
// values are read as they are stored (near the tensor's end through a copy), so a 50%-sparse
// bf16 row streams 9 bits per weight, not 16.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <array>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BM_AVX2 1
#endif

namespace {

constexpr int kMaxRows = 8;

enum class ValueKind { kBf16, kFp16, kFp32 };

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int shift = 0;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | ((113 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float value_at(const void* values, ValueKind kind, int64_t i) {
  if (kind == ValueKind::kFp32) return static_cast<const float*>(values)[i];
  const uint16_t raw = static_cast<const uint16_t*>(values)[i];
  if (kind == ValueKind::kFp16) return half_to_float(raw);
  const uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Columns [from, K) of one weight row, one set bit at a time; `used` values are consumed.
void row_portable(const uint8_t* mask, const void* values, ValueKind kind, int64_t used,
                  const float* x, int64_t rows, int64_t k_cols, int64_t from, float* acc) {
  for (int64_t k = from; k < k_cols; ++k) {
    if (!((mask[k >> 3] >> (k & 7)) & 1)) continue;
    const float w = value_at(values, kind, used++);
    for (int64_t r = 0; r < rows; ++r) acc[r] += w * x[r * k_cols + k];
  }
}

#ifdef BM_AVX2
// lane j of index[b]: the rank of bit j among b's set bits (which value goes to lane j), with
// the sign bit set where bit j is clear (vpermps reads only the low 3 bits; blendv the sign)
struct ExpandTable {
  alignas(32) std::array<std::array<int32_t, 8>, 256> index;
  ExpandTable() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        const bool set = (b >> j) & 1;
        index[b][j] = set ? rank : static_cast<int32_t>(0x80000000u);
        rank += set;
      }
    }
  }
};

const ExpandTable& expand_table() {
  static const ExpandTable instance;
  return instance;
}

// 8 values from p widened to fp32 (p holds at least 8).
template <ValueKind kKind>
inline __m256 load8(const void* p) {
  if constexpr (kKind == ValueKind::kFp32) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  } else {
    const __m128i raw = _mm_loadu_si128(static_cast<const __m128i*>(p));
    if constexpr (kKind == ValueKind::kFp16) return _mm256_cvtph_ps(raw);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}

// Whole bytes of the row (columns [0, K - K % 8)); returns the values consumed. kChecked: the
// row is the tensor's last, so a load of 8 values past its end goes through a copy (other rows
// read into the next row, whose lanes the blend zeroes). kAcc independent sums per activation
// row hide the FMA latency when there are few rows.
template <ValueKind kKind, int kRows, bool kChecked>
int64_t row_vector(const uint8_t* mask, const void* values, int64_t kept, const float* x,
                   int64_t k_cols, float* out) {
  constexpr int64_t kSize = kKind == ValueKind::kFp32 ? 4 : 2;
  constexpr int kAcc = kRows == 1 ? 4 : (kRows == 2 ? 2 : 1);
  const ExpandTable& t = expand_table();
  const auto* base = static_cast<const uint8_t*>(values);
  alignas(32) uint8_t tail[8 * kSize] = {};
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc[kAcc][kRows];
  for (int a = 0; a < kAcc; ++a)
    for (int r = 0; r < kRows; ++r) acc[a][r] = zero;
  int64_t used = 0;
  const int64_t steps = k_cols / 8;
  // one step: columns [8i, 8i + 8) with mask byte b, whose first value is number `at`
  auto step = [&](int64_t i, unsigned b, int64_t at, int a) {
    const void* src = base + at * kSize;
    if constexpr (kChecked) {
      if (at + 8 > kept) {
        std::memcpy(tail, src, (kept - at) * kSize);
        src = tail;
      }
    }
    const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.index[b].data()));
    const __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(load8<kKind>(src), index), zero,
                                      _mm256_castsi256_ps(index));
    for (int r = 0; r < kRows; ++r) {
      acc[a][r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * k_cols + 8 * i), acc[a][r]);
    }
  };
  int64_t i = 0;
  for (; i + 8 <= steps; i += 8) {  // 64 columns: one load of their mask bytes
    uint64_t word;
    std::memcpy(&word, mask + i, 8);
    if (word == 0) continue;
    for (int j = 0; j < 8; ++j) {
      const unsigned b = (word >> (8 * j)) & 0xffu;
      if (b) {
        step(i + j, b, used, j % kAcc);
        used += __builtin_popcount(b);
      }
    }
  }
  for (; i < steps; ++i) {
    if (mask[i]) {
      step(i, mask[i], used, 0);
      used += __builtin_popcount(mask[i]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    __m256 sum = acc[0][r];
    for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, acc[a][r]);
    out[r] = hsum(sum);
  }
  return used;
}

template <ValueKind kKind, bool kChecked>
int64_t row_vector_rows(int64_t rows, const uint8_t* mask, const void* values, int64_t kept,
                        const float* x, int64_t k_cols, float* out) {
  switch (rows) {
    case 1: return row_vector<kKind, 1, kChecked>(mask, values, kept, x, k_cols, out);
    case 2: return row_vector<kKind, 2, kChecked>(mask, values, kept, x, k_cols, out);
    case 3: return row_vector<kKind, 3, kChecked>(mask, values, kept, x, k_cols, out);
    case 4: return row_vector<kKind, 4, kChecked>(mask, values, kept, x, k_cols, out);
    case 5: return row_vector<kKind, 5, kChecked>(mask, values, kept, x, k_cols, out);
    case 6: return row_vector<kKind, 6, kChecked>(mask, values, kept, x, k_cols, out);
    case 7: return row_vector<kKind, 7, kChecked>(mask, values, kept, x, k_cols, out);
    default: return row_vector<kKind, 8, kChecked>(mask, values, kept, x, k_cols, out);
  }
}

template <bool kChecked>
int64_t row_vector_kind(ValueKind kind, int64_t rows, const uint8_t* mask, const void* values,
                        int64_t kept, const float* x, int64_t k_cols, float* out) {
  switch (kind) {
    case ValueKind::kBf16:
      return row_vector_rows<ValueKind::kBf16, kChecked>(rows, mask, values, kept, x, k_cols,
                                                         out);
    case ValueKind::kFp16:
      return row_vector_rows<ValueKind::kFp16, kChecked>(rows, mask, values, kept, x, k_cols,
                                                         out);
    default:
      return row_vector_rows<ValueKind::kFp32, kChecked>(rows, mask, values, kept, x, k_cols,
                                                         out);
  }
}

// Rows before the tensor's last 8 values' row may read 8 values past their own end.
int64_t row_vector_any(bool last, ValueKind kind, int64_t rows, const uint8_t* mask,
                       const void* values, int64_t kept, const float* x, int64_t k_cols,
                       float* out) {
  if (last) return row_vector_kind<true>(kind, rows, mask, values, kept, x, k_cols, out);
  return row_vector_kind<false>(kind, rows, mask, values, kept, x, k_cols, out);
}
#endif

}  // namespace

bool vectorized() {
#ifdef BM_AVX2
  return true;
#else
  return false;
#endif
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor bitmask, torch::Tensor values) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous (R, K) float32 tensor");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most ", kMaxRows, " activation rows a call");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == torch::kUInt8 &&
                  bitmask.is_contiguous(),
              "bitmask must be a contiguous (N, ceil(K/8)) uint8 tensor");
  TORCH_CHECK(bitmask.size(1) == (x.size(1) + 7) / 8, "bitmask rows have the wrong size");
  TORCH_CHECK(values.dim() == 2 && values.size(0) == bitmask.size(0) && values.is_contiguous(),
              "values must be a contiguous (N, KEPT) tensor");
  ValueKind kind;
  switch (values.scalar_type()) {
    case torch::kBFloat16: kind = ValueKind::kBf16; break;
    case torch::kHalf: kind = ValueKind::kFp16; break;
    case torch::kFloat32: kind = ValueKind::kFp32; break;
    default: TORCH_CHECK(false, "values must be bfloat16, float16 or float32");
  }
  const int64_t rows = x.size(0), k_cols = x.size(1), out_features = bitmask.size(0);
  const int64_t kept = values.size(1), mask_stride = bitmask.size(1);
  const int64_t value_size = values.element_size();
  auto out = torch::empty({rows, out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  const auto* vp = static_cast<const uint8_t*>(values.data_ptr());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    float acc[kMaxRows];
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* mask = mp + o * mask_stride;
      const void* row_values = vp + o * kept * value_size;
      int64_t used = 0, from = 0;
      for (int64_t r = 0; r < rows; ++r) acc[r] = 0.f;
#ifdef BM_AVX2
      // values after this row's: at least 8 unless the row is among the last (kept may be < 8)
      const bool last = (out_features - 1 - o) * kept < 8;
      used = row_vector_any(last, kind, rows, mask, row_values, kept, xp, k_cols, acc);
      from = k_cols - k_cols % 8;
#endif
      row_portable(mask, row_values, kind, used, xp, rows, k_cols, from, acc);
      for (int64_t r = 0; r < rows; ++r) op[r * out_features + o] = acc[r];
    }
  });
  return out;
}
