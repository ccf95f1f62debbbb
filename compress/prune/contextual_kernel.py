"""The decode kernel of contextual sparsity: ``y = W[:, kept] @ x[kept]`` for one token.

For batch-1 decode the input ``x`` (``in_features``) is compared with the layer's threshold and
only the columns of ``W`` whose input entry survives are read. The weight is held transposed,
``weight_t`` (``in_features``, ``out_features``) contiguous, so a kept input entry is one
contiguous row: the kernel streams ``kept * out_features`` weights instead of all of them, which
is what a memory-bound decode step pays for.

Paths, one per call (the choice never changes the result beyond float rounding order):

* ``native``: a small C++ extension of ours (the source below), built on first use by
  :func:`compress.utils.native.load_native` once per instruction-set level (AVX2, AVX-512,
  ...; never ``-march=native``). One pass finds the kept entries, then rows are accumulated
  four at a time into an fp32 accumulator (bf16 / fp32 weights; bf16 rows widened by a shift),
  with the output columns split over the intra-op threads.
* ``torch``: ``x[kept] @ weight_t[kept]`` (an index_select copy, then a GEMV), used when the
  native build is unavailable (logged once by the builder) and as the test oracle's twin.

The reference (the test oracle) is the masked dense product, :func:`masked_linear_reference`.
"""

from __future__ import annotations

import torch

from compress.utils.native import build_isa, load_native

__all__ = [
    "SOURCE",
    "masked_linear_reference",
    "native",
    "sparse_gemv",
    "sparse_gemv_torch",
]

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline uint16_t float_to_bf16(float v) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return 0x7fc0;  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

template <typename W>
inline float widen(W v);
template <>
inline float widen<float>(float v) { return v; }
template <>
inline float widen<uint16_t>(uint16_t v) { return bf16_to_float(v); }

// acc[lo:hi] += sum over kept k of xs[k] * w[idx[k], lo:hi]
template <typename W>
void accumulate(const W* w, int64_t cols, const std::vector<int64_t>& idx,
                const std::vector<float>& xs, float* acc, int64_t lo, int64_t hi) {
  const int64_t n = static_cast<int64_t>(idx.size());
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const W* r0 = w + idx[k] * cols;
    const W* r1 = w + idx[k + 1] * cols;
    const W* r2 = w + idx[k + 2] * cols;
    const W* r3 = w + idx[k + 3] * cols;
    const float a0 = xs[k], a1 = xs[k + 1], a2 = xs[k + 2], a3 = xs[k + 3];
#pragma GCC ivdep
    for (int64_t j = lo; j < hi; ++j) {
      acc[j] += a0 * widen<W>(r0[j]) + a1 * widen<W>(r1[j]) + a2 * widen<W>(r2[j]) +
                a3 * widen<W>(r3[j]);
    }
  }
  for (; k < n; ++k) {
    const W* r0 = w + idx[k] * cols;
    const float a0 = xs[k];
#pragma GCC ivdep
    for (int64_t j = lo; j < hi; ++j) acc[j] += a0 * widen<W>(r0[j]);
  }
}

template <typename X>
void gather(const X* x, int64_t n, double threshold, std::vector<int64_t>& idx,
            std::vector<float>& xs) {
  const float t = static_cast<float>(threshold);
  for (int64_t i = 0; i < n; ++i) {
    const float v = widen<X>(x[i]);
    if (v > t || v < -t) {
      idx.push_back(i);
      xs.push_back(v);
    }
  }
}

}  // namespace

// x: (in,) fp32 or bf16; weight_t: (in, out) fp32 or bf16, contiguous; returns (out,) in x's
// dtype: the product of weight_t's rows whose |x| > threshold with those entries of x.
torch::Tensor sparse_gemv(torch::Tensor x, torch::Tensor weight_t, double threshold) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "x must be a contiguous vector");
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.is_contiguous(), "weight_t must be contiguous 2-D");
  TORCH_CHECK(weight_t.size(0) == x.size(0), "weight_t rows must equal x's length");
  const auto xt = x.scalar_type();
  const auto wt = weight_t.scalar_type();
  TORCH_CHECK(xt == torch::kFloat || xt == torch::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(wt == torch::kFloat || wt == torch::kBFloat16, "weight must be float32 or bfloat16");
  const int64_t n = x.size(0), cols = weight_t.size(1);
  std::vector<int64_t> idx;
  std::vector<float> xs;
  idx.reserve(n);
  xs.reserve(n);
  if (xt == torch::kFloat) {
    gather<float>(x.data_ptr<float>(), n, threshold, idx, xs);
  } else {
    gather<uint16_t>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), n,
                     threshold, idx, xs);
  }
  std::vector<float> acc(cols, 0.0f);
  float* accp = acc.data();
  const int64_t grain = 256;
  at::parallel_for(0, cols, grain, [&](int64_t lo, int64_t hi) {
    if (wt == torch::kFloat) {
      accumulate<float>(weight_t.data_ptr<float>(), cols, idx, xs, accp, lo, hi);
    } else {
      accumulate<uint16_t>(
          reinterpret_cast<const uint16_t*>(weight_t.data_ptr<at::BFloat16>()), cols, idx, xs,
          accp, lo, hi);
    }
  });
  auto out = torch::empty({cols}, x.options());
  if (xt == torch::kFloat) {
    std::memcpy(out.data_ptr<float>(), accp, sizeof(float) * cols);
  } else {
    auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    for (int64_t j = 0; j < cols; ++j) o[j] = float_to_bf16(accp[j]);
  }
  return out;
}
"""

_NAME = "compress_contextual"


def native() -> object | None:
    """The built extension for this CPU's instruction-set level, or ``None`` (no compiler,
    ``COMPRESS_NATIVE=0``; the builder logs why once)."""
    return load_native(_NAME, SOURCE, ["sparse_gemv"], isa=build_isa())


def sparse_gemv_torch(x: torch.Tensor, weight_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` (in,), ``weight_t`` (in, out) -> (out,): the kept rows gathered, then one GEMV."""
    kept = (x.abs() > threshold).nonzero().squeeze(1)  # (kept,)
    rows = weight_t.index_select(0, kept)  # (kept, out)
    return (x.index_select(0, kept).to(rows.dtype) @ rows).to(x.dtype)


def sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` (in,), ``weight_t`` (in, out) contiguous -> (out,) in ``x``'s dtype: the product of
    the rows of ``weight_t`` whose input entry has ``|x| > threshold``. Native where built, else
    :func:`sparse_gemv_torch`."""
    module = native() if x.device.type == "cpu" else None
    if module is not None and x.dtype in _NATIVE and weight_t.dtype in _NATIVE:
        return module.sparse_gemv(x.contiguous(), weight_t, float(threshold))  # type: ignore[attr-defined]
    return sparse_gemv_torch(x, weight_t, threshold)


_NATIVE = (torch.float32, torch.bfloat16)


def masked_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, threshold: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The oracle: entries with ``|x| <= threshold`` zeroed, then the dense ``x @ weight.T``.

    ``x`` (..., in), ``weight`` (out, in) -> (..., out), in fp32 for comparison."""
    masked = torch.where(x.abs() > threshold, x, torch.zeros_like(x)).to(torch.float32)
    out = masked @ weight.to(torch.float32).T
    return out if bias is None else out + bias.to(torch.float32)
