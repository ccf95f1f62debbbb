// Online Hadamard transform of rows, y = x Hᵀ / sqrt(n), for H = S ⊗ M: S a Sylvester matrix of
// order 2^k (the leading factors of 2) and M a small dense ±1 block (the Paley factors).
//
// The transform runs before every down_proj of a rotated model at inference time (rotate's
// online_down). Through torch it is two tensordots, two movedims and a division, about 65 µs per
// 1536-wide token on one thread, mostly dispatch; here it is n·k butterflies plus n·m
// multiply-adds in float32 per row, a few µs. Compiled by compress.utils.native per instruction
// set level; loops are written so the compiler vectorizes the inner channel loop.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
void transform_rows(const T* x, T* y, int64_t rows, int64_t n, const float* block, int64_t order) {
  const int64_t outer = n / order;
  const float scale = 1.0f / std::sqrt(static_cast<float>(n));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> work(n);
    float* a = work.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* src = x + r * n;
      for (int64_t i = 0; i < n; ++i) a[i] = static_cast<float>(src[i]);
      // Sylvester butterflies over the outer index: rows of `order` channels at a time.
      for (int64_t h = 1; h < outer; h *= 2) {
        for (int64_t i = 0; i < outer; i += 2 * h) {
          for (int64_t j = i; j < i + h; ++j) {
            float* u = a + j * order;
            float* v = a + (j + h) * order;
            for (int64_t c = 0; c < order; ++c) {
              const float p = u[c];
              const float q = v[c];
              u[c] = p + q;
              v[c] = p - q;
            }
          }
        }
      }
      T* dst = y + r * n;
      if (order == 1) {
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(a[i] * scale);
        continue;
      }
      // The dense block over the inner index of each group.
      for (int64_t o = 0; o < outer; ++o) {
        const float* in = a + o * order;
        for (int64_t c = 0; c < order; ++c) {
          const float* coefficients = block + c * order;
          float acc = 0.0f;
          for (int64_t d = 0; d < order; ++d) acc += coefficients[d] * in[d];
          dst[o * order + c] = static_cast<T>(acc * scale);
        }
      }
    }
  });
}

}  // namespace

// x: (rows, n) contiguous float32 / bfloat16 / float16; block: (order, order) float32 with n a
// power-of-two multiple of order. Returns a new tensor of x's dtype.
torch::Tensor hadamard_rows(torch::Tensor x, torch::Tensor block) {
  TORCH_CHECK(x.device().is_cpu() && block.device().is_cpu(), "hadamard_rows: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "hadamard_rows: x must be 2-D and contiguous");
  TORCH_CHECK(block.dim() == 2 && block.size(0) == block.size(1), "hadamard_rows: square block");
  TORCH_CHECK(block.scalar_type() == torch::kFloat32 && block.is_contiguous(),
              "hadamard_rows: block must be contiguous float32");
  const int64_t n = x.size(1);
  const int64_t order = block.size(0);
  TORCH_CHECK(order > 0 && n % order == 0, "hadamard_rows: block order must divide the width");
  const int64_t outer = n / order;
  TORCH_CHECK((outer & (outer - 1)) == 0, "hadamard_rows: width / block order must be 2^k");
  auto y = torch::empty_like(x);
  const float* m = block.data_ptr<float>();
  switch (x.scalar_type()) {
    case torch::kFloat32:
      transform_rows(x.data_ptr<float>(), y.data_ptr<float>(), x.size(0), n, m, order);
      break;
    case torch::kBFloat16:
      transform_rows(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), x.size(0), n, m,
                     order);
      break;
    case torch::kFloat16:
      transform_rows(x.data_ptr<at::Half>(), y.data_ptr<at::Half>(), x.size(0), n, m, order);
      break;
    default:
      TORCH_CHECK(false, "hadamard_rows: float32, bfloat16 or float16 only");
  }
  return y;
}
