// A training BatchNorm2d folded into the fused site (conv -> BN -> site): its batch statistics in one pass over its
// input, h's rows made from that input as the sweeps read them (AffineRows), and its backward in place after the
// site's last backward sweep took its two sums (BatchNormSums).
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "common.h"
#include "params.h"
#include "rings.h"

#if WB_HAS_AVX512_PATH
namespace wb {

// A training BatchNorm's batch statistics of an NHWC map: each channel's mean and biased variance, in one pass. Sums
// of x - x[0, c] (the shift keeps the variance exact when the mean is large against the spread): a row in float, an
// image's rows in order in double, then the images in order, so the numbers do not depend on the thread count.
std::pair<std::vector<double>, std::vector<double>> batch_moments(const at::Tensor& x);

// What the BatchNorm's forward leaves for the site and for its backward.
struct BatchNormForward {
  at::Tensor mean;          // the batch mean (C)
  at::Tensor invstd;        // 1 / sqrt(biased batch variance + eps) (C)
  std::vector<float> affine;   // h = A x + B: A (C floats) then B (C floats)

  AffineForm form() const { return {affine.data(), affine.data() + affine.size() / 2}; }
};

// The forward of a training BatchNorm (weight and bias may be empty) whose NHWC input is x: its batch statistics and
// affine form, with its running statistics (when it keeps them) updated in place by options.momentum, the variance
// unbiased, as BatchNorm2d does. input_sizes: the input's shape as the caller gave it, for the error message.
BatchNormForward batch_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    const BatchNormOptions& options, at::IntArrayRef input_sizes);

// BatchNorm's backward (training) from the gradient of its output g, in place: g = A g + P x + Q per channel with
// A = weight invstd, P = -A invstd S / n, Q = -A sum_g / n - P mean, where sums holds sum_g = sum g and sum g (x -
// mean) (S = that times invstd: the weight's gradient; sum_g is the bias's). x: the NHWC input. Returns the weight's
// and the bias's gradients.
std::pair<at::Tensor, at::Tensor> batch_norm_backward_in_place(at::Tensor& g, const at::Tensor& x,
                                                               const at::Tensor& mean,
                                                               const at::Tensor& invstd,
                                                               const at::Tensor& weight,
                                                               const std::vector<double>& sums);

}  // namespace wb
#endif  // WB_HAS_AVX512_PATH
