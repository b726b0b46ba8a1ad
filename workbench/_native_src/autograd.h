// The fused site as one C++ autograd node (FusedSiteFunction in autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "common.h"
#include "params.h"

#if WB_HAS_AVX512_PATH
namespace wb {

// Everything the fused site takes besides the node's differentiable inputs (h, and a fused BatchNorm's weight and
// bias).
struct FusedSiteArgs {
  PhiKernels phi;              // frozen: the node gives phi no gradient
  at::Tensor running_mean;  // the site's (C, 4) scale statistics, updated in place when training
  at::Tensor running_var;
  NoiseOptions noise;          // eps as the caller gave it ((B, C, H, W), any layout), or empty to draw it
  SiteOptions site;
  ScaleOptions scale;
  std::optional<BatchNormOptions> batch_norm;  // h is a training BatchNorm2d's output and the node takes its input
};

// h -> (out, scale, [mean, std] of the multiplier), differentiable once with respect to h, bn_weight and bn_bias
// (empty tensors where there is no BatchNorm or it has no affine parameters).
std::vector<at::Tensor> fused_site(const at::Tensor& h, const at::Tensor& bn_weight,
                                   const at::Tensor& bn_bias, const FusedSiteArgs& args);

}  // namespace wb
#endif  // WB_HAS_AVX512_PATH
