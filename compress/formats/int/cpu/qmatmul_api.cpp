// The functions bound into Python (part of the qmatmul translation unit; see qmatmul.cpp):
// each picks the widest path this build has for the format and activation dtype.

namespace {

// The vector paths need whole 8-code blocks inside one group.
bool vector_ok(const Packed& p) {
#ifdef COMPRESS_AVX2
  return p.groups == 1 || p.group % 8 == 0;
#else
  (void)p;
  return false;
#endif
}

void dequant_rows(const Packed& p, int64_t n0, int64_t n1, float* out) {
#ifdef COMPRESS_AVX2
  if (vector_ok(p)) {
    switch (p.bits) {
      case 2: return dequant_rows_avx2<2>(p, n0, n1, out);
      case 3: return dequant_rows_avx2<3>(p, n0, n1, out);
      case 4: return dequant_rows_avx2<4>(p, n0, n1, out);
      case 5: return dequant_rows_avx2<5>(p, n0, n1, out);
      case 6: return dequant_rows_avx2<6>(p, n0, n1, out);
      case 7: return dequant_rows_avx2<7>(p, n0, n1, out);
      default: return dequant_rows_avx2<8>(p, n0, n1, out);
    }
  }
#endif
  for (int64_t n = n0; n < n1; ++n) dequant_row_scalar(p, n, out + (n - n0) * p.K);
}

using Bf16RowsFn = void (*)(const Packed&, int64_t, int64_t, uint16_t*, int64_t);

// Rows [n0, n1) as bf16, row stride ld (>= K; columns past K are left alone).
Bf16RowsFn bf16_rows_fn(const Packed& p) {
#ifdef COMPRESS_AVX512
  if (p.groups == 1 || p.group % 32 == 0) {  // whole 32-code steps (else the AVX2 per-8 path)
    switch (p.bits) {
      case 2: return dequant_rows_avx512_bf16<2>;
      case 3: return dequant_rows_avx512_bf16<3>;
      case 4: return dequant_rows_avx512_bf16<4>;
      case 5: return dequant_rows_avx512_bf16<5>;
      case 6: return dequant_rows_avx512_bf16<6>;
      case 7: return dequant_rows_avx512_bf16<7>;
      default: return dequant_rows_avx512_bf16<8>;
    }
  }
#endif
#ifdef COMPRESS_AVX2
  if (vector_ok(p)) {
    switch (p.bits) {
      case 2: return dequant_rows_avx2_bf16<2>;
      case 3: return dequant_rows_avx2_bf16<3>;
      case 4: return dequant_rows_avx2_bf16<4>;
      case 5: return dequant_rows_avx2_bf16<5>;
      case 6: return dequant_rows_avx2_bf16<6>;
      case 7: return dequant_rows_avx2_bf16<7>;
      default: return dequant_rows_avx2_bf16<8>;
    }
  }
#endif
  return [](const Packed& q, int64_t n0, int64_t n1, uint16_t* out, int64_t ld) {
    for (int64_t n = n0; n < n1; ++n) dequant_row_scalar_bf16(q, n, out + (n - n0) * ld);
  };
}

bool amx_ready() {
#ifdef COMPRESS_AMX
  return amx_permitted();
#else
  return false;
#endif
}

#ifdef COMPRESS_AVX2
// The int16-activation GEMV with the inner loop measured fastest for the width (Sapphire Rapids,
// 4096^2, one core, ms at 1 / 4 / 8 rows, AVX-512 against AVX2): 4-bit 1.27/2.28/4.50 against
// 1.44/3.28/5.77, 8-bit 2.18/3.21/6.32 against 2.46/3.77/7.27, 5 and 6 bits equal at one row and
// 10% faster at 4 and 8. 3-bit codes keep the AVX2 loop (2.33/3.41/6.70 against 1.65/2.89/5.86:
// their unpack is shuffle-bound and the 512-bit halves add to it), and so do 2-bit codes at one
// row (0.91 against 0.79; 1.85/3.55 against 2.07/4.14 at 4 and 8).
bool gemv_int16_best(const Packed& p, const float* xs, int64_t M, int64_t K, float* o) {
#ifdef COMPRESS_AVX512
  if (!(p.bits == 3 || (p.bits == 2 && M == 1))) return gemv_int16<Avx512Dots>(p, xs, M, K, o);
#endif
  return gemv_int16<Avx2Dots>(p, xs, M, K, o);
}
#endif

// x (M, K) contiguous fp32 -> (M, N) fp32, never materialising the weight. Meant for small M.
// int16_acts: x came from bf16/fp16; round it to int16 per chunk (see gemv_tile_wide).
torch::Tensor gemv_fp32_rows(const torch::Tensor& xc, const torch::Tensor& qweight,
                             const torch::Tensor& scales, const torch::Tensor& qzeros,
                             int64_t bits, int64_t group, bool int16_acts) {
  const int64_t K = xc.size(1), M = xc.size(0);
  const Packed p = make_packed(qweight, scales, qzeros, bits, group, K);
  auto out = torch::empty({M, p.N}, torch::kFloat);
  if (M == 0 || p.N == 0) return out;
#ifdef COMPRESS_AVX2
  if (vector_ok(p)) {
    const float* xs = xc.data_ptr<float>();
    float* o = out.data_ptr<float>();
    const bool done = int16_acts && gemv_int16_best(p, xs, M, K, o);
    if (!done) gemv_fp32(p, xs, M, K, o);
    return out;
  }
#endif
  // Any group size, any CPU: dequantize one row at a time and dot it with every x row.
  const float* xs = xc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      dequant_row_scalar(p, n, w.data());
      for (int64_t m = 0; m < M; ++m) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += w[k] * xs[m * K + k];
        o[m * p.N + n] = s;
      }
    }
  });
  return out;
}

// Weight rows per GEMM tile: `tile` if positive, else 2 MiB of bf16 weights (4 MiB fp32) per
// tile: 256 rows at 4096 inputs, 1820 at SmolLM2's 576 (its matrices whole). Measured
// with bf16 tiles on Sapphire Rapids (one core, ms): 1536x576 at 512 tokens 1.70 / 1.35 / 1.20
// / 1.15 / 1.18 for 64 / 128 / 256 / 512 / whole; 4096^2 at 512 tokens 28.5 / 25.3 / 22.4 /
// 21.6 / 37.1 for 64 / 128 / 256 / 512 / whole.
int64_t tile_rows(int64_t tile, int64_t K) {
  return tile > 0 ? tile : std::max<int64_t>(64, (int64_t{1} << 20) / std::max<int64_t>(K, 1));
}

// x (M, K) contiguous -> (M, N) in x's dtype (+ bias in x's dtype, or empty) through torch's
// GEMM on tiles of weight rows that dequant(p, n0, n1, dst) writes in x's dtype (row stride K).
// One parallel region per call: each thread dequantizes its own tiles into its own buffer and
// multiplies them there (torch's GEMM runs single-threaded inside the region). A fork and join
// per tile and phase waited a whole scheduler slice each time another job held a core (2 cores,
// 4096^2 at 32 tokens: 250 ms against 8 for bf16).
template <typename Dequant>
torch::Tensor gemm_tiles(const torch::Tensor& x, const Packed& p, const torch::Tensor& bias,
                         int64_t tile_arg, const Dequant& dequant) {
  const int64_t K = x.size(1), M = x.size(0), N = p.N;
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  int64_t tile = tile_rows(tile_arg, K);
  if (tile_arg <= 0) {  // every thread gets a tile
    const int64_t threads = at::get_num_threads();
    tile = std::min(tile, ((N + threads - 1) / threads + 15) / 16 * 16);
  }
  const int64_t tiles = (N + tile - 1) / tile;
  // InferenceMode is per thread: `out` made under it is an inference tensor, and a worker
  // thread without the mode may not write into it
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode mode(inference);
    auto w = torch::empty({std::min(tile, N), K}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, n1 = std::min(N, n0 + tile);
      auto wt = w.narrow(0, 0, n1 - n0);
      dequant(p, n0, n1, wt.data_ptr());
      // straight into the output's columns (row stride N, which BLAS takes as its ldc): no
      // temporary tile result and no copy of it
      auto slice = out.narrow(1, n0, n1 - n0);
      if (bias.numel() > 0) {
        at::addmm_out(slice, bias.narrow(0, n0, n1 - n0), x, wt.t());
      } else {
        at::mm_out(slice, x, wt.t());
      }
    }
  });
  return out;
}

// x (M, K) contiguous fp32 -> (M, N) fp32 by fp32 tiles (exact: the reference's own product).
torch::Tensor gemm_fp32_rows(const torch::Tensor& xc, const torch::Tensor& qweight,
                             const torch::Tensor& scales, const torch::Tensor& qzeros,
                             int64_t bits, int64_t group, int64_t tile_arg) {
  const Packed p = make_packed(qweight, scales, qzeros, bits, group, xc.size(1));
  return gemm_tiles(xc, p, torch::Tensor(torch::empty(0)), tile_arg,
                    [](const Packed& q, int64_t n0, int64_t n1, void* dst) {
                      dequant_rows(q, n0, n1, static_cast<float*>(dst));
                    });
}

// x (M, K) contiguous bf16 -> (M, N) bf16 (+ bias) by bf16 tiles in torch's bf16 GEMM (fp32
// accumulation), the reference's own weights and product.
torch::Tensor gemm_bf16_tiles(const torch::Tensor& xb, const Packed& p, const torch::Tensor& bias,
                              int64_t tile_arg) {
  const Bf16RowsFn rows = bf16_rows_fn(p);
  const auto b = bias.numel() > 0 ? bias.to(torch::kBFloat16) : bias;
  const int64_t K = p.K;
  return gemm_tiles(xb, p, b, tile_arg, [&](const Packed& q, int64_t n0, int64_t n1, void* dst) {
    rows(q, n0, n1, static_cast<uint16_t*>(dst), K);
  });
}

// (..., K) -> contiguous (M, K) in dtype; a no-op when x already is.
torch::Tensor as_rows(const torch::Tensor& x, c10::ScalarType dtype = torch::kFloat) {
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), "x must be floating point");
  return x.reshape({-1, x.size(-1)}).to(dtype).contiguous();
}

// (M, N) -> (..., N) in x's dtype, plus the bias: the conversions of a Python wrapper, without
// its per-op dispatch cost (tens of microseconds per decode step and layer).
torch::Tensor finish(torch::Tensor out, const torch::Tensor& bias, const torch::Tensor& x) {
  if (bias.numel() > 0) out.add_(bias);
  auto sizes = x.sizes().vec();
  sizes.back() = out.size(1);
  return out.to(x.scalar_type()).view(sizes);
}

torch::Tensor reshape_like(const torch::Tensor& out, const torch::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.back() = out.size(1);
  return out.view(sizes);
}

}  // namespace

// (N, K) fp32 weight; for tests.
torch::Tensor dequantize(torch::Tensor qweight, torch::Tensor scales, torch::Tensor qzeros,
                         int64_t bits, int64_t group, int64_t K) {
  const Packed p = make_packed(qweight, scales, qzeros, bits, group, K);
  auto out = torch::empty({p.N, K}, torch::kFloat);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    dequant_rows(p, n0, n1, dst + n0 * K);
  });
  return out;
}

// (N, K) bf16 weight as the GEMM's tiles hold it; for tests.
torch::Tensor dequantize_bf16(torch::Tensor qweight, torch::Tensor scales, torch::Tensor qzeros,
                              int64_t bits, int64_t group, int64_t K) {
  const Packed p = make_packed(qweight, scales, qzeros, bits, group, K);
  auto out = torch::empty({p.N, K}, torch::kBFloat16);
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const Bf16RowsFn rows = bf16_rows_fn(p);
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    rows(p, n0, n1, dst + n0 * K, K);
  });
  return out;
}

// x (..., K) fp32/bf16/fp16 -> (..., N) in x's dtype; bias may be empty. For few rows (decode).
torch::Tensor gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                   torch::Tensor qzeros, int64_t bits, int64_t group, torch::Tensor bias,
                   bool int16_acts) {
  return finish(gemv_fp32_rows(as_rows(x), qweight, scales, qzeros, bits, group, int16_acts),
                bias, x);
}

// x (..., K) fp32/bf16/fp16 -> (..., N) in x's dtype (prefill). bf16 x: the AMX GEMM where this
// build and the CPU have it; else, up to dot_max_rows rows, the AVX512-BF16 GEMM where this
// build and the CPU have that; else (bf16_tiles) bf16 tiles through torch's GEMM; everything
// else fp32 tiles through torch's fp32 GEMM (exact for fp32 x).
torch::Tensor gemm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                   torch::Tensor qzeros, int64_t bits, int64_t group, torch::Tensor bias,
                   int64_t tile, bool bf16_tiles, int64_t dot_max_rows) {
  if (x.scalar_type() == torch::kBFloat16) {
    const torch::Tensor xb = as_rows(x, torch::kBFloat16);
    const Packed p = make_packed(qweight, scales, qzeros, bits, group, xb.size(1));
#ifdef COMPRESS_AVX512
    const int64_t M = xb.size(0);
    bool amx_here = false;
#ifdef COMPRESS_AMX
    amx_here = amx_ready();
#endif
    const bool dot_here = !amx_here && M <= dot_max_rows && bf16_dot_supported();
    if ((amx_here || dot_here) && panel_ok(p) && M > 0 && p.N > 0) {
      auto out = torch::empty({M, p.N}, xb.options());
      const torch::Tensor b = bias.numel() > 0 ? bias.to(torch::kFloat).contiguous() : bias;
      const auto* xs = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
      const float* bp = b.numel() > 0 ? b.data_ptr<float>() : nullptr;
      auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
      bool done = false;
#ifdef COMPRESS_AMX
      done = amx_here && amx_gemm(p, xs, M, bp, op);
#endif
      if (!done && dot_here) done = dot_gemm(p, xs, M, bp, op);
      if (done) return reshape_like(out, x);
    }
#else
    (void)dot_max_rows;
#endif
    if (bf16_tiles) {
      return reshape_like(gemm_bf16_tiles(xb, p, bias, tile), x);
    }
  }
  return finish(gemm_fp32_rows(as_rows(x), qweight, scales, qzeros, bits, group, tile), bias, x);
}

// The instruction set this binary was built for (compress.utils.native.ISA_LEVELS).
std::string isa() {
#if defined(COMPRESS_AMX)
  return "amx";
#elif defined(COMPRESS_AVX512)
  return "avx512";
#elif defined(COMPRESS_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

// Whether the AMX GEMM runs here: an AMX build and the kernel's permission for tile state.
bool amx() { return amx_ready(); }

// Whether the AVX512-BF16 GEMM runs here: an AVX-512 build on a CPU with VDPBF16PS, where the
// AMX GEMM does not go first (gemm's order).
bool bf16_dot() {
#ifdef COMPRESS_AVX512
  return bf16_dot_supported() && !amx_ready();
#else
  return false;
#endif
}

bool vectorized() {
#ifdef COMPRESS_AVX2
  return true;
#else
  return false;
#endif
}
