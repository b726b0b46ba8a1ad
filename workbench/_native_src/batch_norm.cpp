// The BatchNorm folded into the fused site (declared, with what each computes, in batch_norm.h).
#include "batch_norm.h"

#if WB_HAS_AVX512_PATH
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

#include "rows_avx512.h"
#include "tensors.h"

namespace wb {

std::pair<std::vector<double>, std::vector<double>> batch_moments(const at::Tensor& x) {
  const Geometry g = geometry(x);
  const idx rw = g.row(), C = g.C;
  const float* xp = x.data_ptr<float>();
  std::vector<float> shift(xp, xp + C);
  std::vector<double> per_image(static_cast<size_t>(g.B * 2 * C), 0.0);  // image b: sums at b 2C, squares after
  at::parallel_for(0, g.B, 1, [&](idx b0, idx b1) {
    std::vector<float> s1(C), s2(C);
    for (idx b = b0; b < b1; ++b) {
      double* acc = per_image.data() + b * 2 * C;
      for (idx r = b * g.H; r < (b + 1) * g.H; ++r) {
        batch_norm_row_sums_avx512<false>(xp + r * rw, nullptr, shift.data(), g.W, C, s1.data(), s2.data());
        for (idx c = 0; c < C; ++c) {
          acc[c] += s1[c];
          acc[C + c] += s2[c];
        }
      }
    }
  });
  std::vector<double> sum(C, 0.0), squares(C, 0.0);
  for (idx b = 0; b < g.B; ++b)
    for (idx c = 0; c < C; ++c) {
      sum[c] += per_image[b * 2 * C + c];
      squares[c] += per_image[b * 2 * C + C + c];
    }
  const double n = static_cast<double>(g.B * g.H * g.W);
  std::vector<double> mean(C), var(C);
  for (idx c = 0; c < C; ++c) {
    const double m = sum[c] / n;
    mean[c] = shift[c] + m;
    var[c] = std::max(0.0, squares[c] / n - m * m);
  }
  return {mean, var};
}


BatchNormForward batch_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    const BatchNormOptions& options, at::IntArrayRef input_sizes) {
  const idx C = x.size(3);
  const idx n = x.numel() / C;
  TORCH_CHECK(n > 1, "BatchNorm in training mode needs more than 1 value per channel, got input of shape ",
              input_sizes);
  const auto [mean, var] = batch_moments(x);
  BatchNormForward out{at::empty({C}), at::empty({C}), std::vector<float>(2 * C)};
  const auto w = weight.numel() ? float_contiguous(weight) : weight;
  const auto b = bias.numel() ? float_contiguous(bias) : bias;
  for (idx c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(var[c] + options.eps);
    const double a = invstd * (w.numel() ? w.data_ptr<float>()[c] : 1.0f);
    out.affine[c] = static_cast<float>(a);
    out.affine[C + c] = static_cast<float>((b.numel() ? b.data_ptr<float>()[c] : 0.0f) - mean[c] * a);
    out.mean.data_ptr<float>()[c] = static_cast<float>(mean[c]);
    out.invstd.data_ptr<float>()[c] = static_cast<float>(invstd);
  }
  if (options.running_mean.numel()) {
    auto rm = options.running_mean.accessor<float, 1>();
    auto rv = options.running_var.accessor<float, 1>();
    const double momentum = options.momentum;
    const double unbiased = static_cast<double>(n) / static_cast<double>(n - 1);
    for (idx c = 0; c < C; ++c) {
      rm[c] = static_cast<float>((1.0 - momentum) * rm[c] + momentum * mean[c]);
      rv[c] = static_cast<float>((1.0 - momentum) * rv[c] + momentum * var[c] * unbiased);
    }
  }
  return out;
}

std::pair<at::Tensor, at::Tensor> batch_norm_backward_in_place(at::Tensor& g, const at::Tensor& x,
                                                               const at::Tensor& mean, const at::Tensor& invstd,
                                                               const at::Tensor& weight,
                                                               const std::vector<double>& sums) {
  const idx C = x.size(3), rw = x.size(2) * C, rows_total = x.size(0) * x.size(1);
  const double n = static_cast<double>(x.numel() / C);
  auto g_weight = at::empty({C}), g_bias = at::empty({C});
  std::vector<float> A(C), P(C), Q(C);
  for (idx c = 0; c < C; ++c) {
    const double is = invstd.data_ptr<float>()[c], m = mean.data_ptr<float>()[c];
    const double a = is * (weight.numel() ? weight.data_ptr<float>()[c] : 1.0f);
    const double s = sums[C + c] * is, p = -a * is * s / n;
    A[c] = static_cast<float>(a);
    P[c] = static_cast<float>(p);
    Q[c] = static_cast<float>(-a * sums[c] / n - p * m);
    g_weight.data_ptr<float>()[c] = static_cast<float>(s);
    g_bias.data_ptr<float>()[c] = static_cast<float>(sums[c]);
  }
  float* gp = g.data_ptr<float>();  // channels_last memory: NHWC
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    const float* __restrict a = A.data();
    const float* __restrict pp = P.data();
    const float* __restrict q = Q.data();
    for (idx r = r0; r < r1_; ++r) {
      float* __restrict grow = gp + r * rw;
      const float* __restrict xrow = xp + r * rw;
      for (idx o = 0; o < rw; o += C)
#pragma omp simd
        for (idx c = 0; c < C; ++c) grow[o + c] = a[c] * grow[o + c] + pp[c] * xrow[o + c] + q[c];
    }
  });
  return {g_weight, g_bias};
}

}  // namespace wb
#endif  // WB_HAS_AVX512_PATH
