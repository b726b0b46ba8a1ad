// The fused site, for a frozen phi on AVX-512 CPUs: the site in two passes over h forward and two backward, with r1,
// g_mu and g_E1 only ever in three-row rings and the multiplier never written (its mean and std are returned
// instead). Maps of a few MB and up are bound by memory bandwidth here, not by arithmetic, so passes that are not
// made are what the fused site gains over the two sweeps. Built only where the AVX-512 rows are (x86-64);
// workbench/_native.py dispatches here only when isa() is "avx512".
//
// Forward: scale_prepass (mean_c h and the scale features), site_scale_forward (the per-channel scale), then
// fused_forward (E1 -> E2 -> noise tail, the layer's ReLU and pool). Backward: fused_backward and scale_backward, or
// with pool fused_backward_pooled alone (after pooled_scale_grad), each after site_scale_backward when training.
// autograd.cpp wires them into one autograd node.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "common.h"
#include "params.h"
#include "rings.h"

#if WB_HAS_AVX512_PATH
namespace wb {

// What the pre-pass returns: mh = mean_c h (B, H, W); training: the scale features f (B, C, 4) and the mask bytes'
// bits 0-3 (K_j * h > 0) when a backward will read them (keep; else empty).
struct Prepass {
  at::Tensor mh, features, mask;
};

// The pre-pass over h (h = A x + B with a fused BatchNorm's affine form, else x); site: training and keep.
Prepass scale_prepass(const at::Tensor& x, const at::Tensor& kscale, const SiteOptions& site,
                      AffineForm affine);

// The per-channel scale and what its backward reads: s (C) and the features' batch mean m (C, 4).
struct SiteScale {
  at::Tensor scale, mean;
};

// s_c = sigmoid(w . [m_c, v_c, channel_ratio, size_ratio]) with m, v the batch mean and unbiased variance of the
// features f (B, C, 4) (training; the running statistics are updated in place, the variance times B / (B - 1) once
// more with double_bessel, as the original) or the running statistics (evaluation, f empty). Sums in double.
SiteScale site_scale_forward(const at::Tensor& f, const at::Tensor& running_mean,
                             const at::Tensor& running_var, const at::Tensor& fc_weight,
                             const ScaleOptions& options);

// g_f (B, C, 4) from g_s (C): the backward of site_scale_forward in training mode (phi frozen: no weight gradient).
at::Tensor site_scale_backward(const at::Tensor& f, const at::Tensor& m, const at::Tensor& s,
                               const at::Tensor& fc_weight, const at::Tensor& g_s);

// What a pooled site keeps for its backward at each window's winner (NHWC maps of the pooled shape; see PooledKeep):
// the winner's place (bytes), and its m, d and p.
struct PooledWinners {
  at::Tensor code, m, d, p;
};

// What fused_forward returns.
struct FusedForward {
  at::Tensor out;        // (B, C, H, W), or pooled (B, C, H / 2, W / 2); channels_last
  at::Tensor a;          // mu + eps (NHWC), kept for the backward of a site without pool; else empty
  at::Tensor stats;      // the multiplier's [mean, std] (unbiased, like torch.std)
  at::Tensor relu_bits;  // E1 > 0, relu_bit_blocks words a pixel; empty without keep
  PooledWinners winners;    // with pool and keep; else empty
};

// out = min(h (1 + k (s softplus(E2(relu(E1(h))) + eps) - 1)), clip) in one sweep, then max(., 0) with relu (the
// layer's ReLU fused in) and the 2x2 max-pool (stride 2) with pool (the layer's pool fused in); with keep, also
// writes what the backward reads: the ReLU bits and a = mu + eps or, with pool, the winners (without keep, those are
// empty). x: h, or a fused BatchNorm's input (affine); mh and scale from the pre-pass and the site scale.
FusedForward fused_forward(const at::Tensor& x, const at::Tensor& mh, const at::Tensor& scale,
                           const PhiKernels& phi, const NoiseOptions& noise, const SiteOptions& site,
                           AffineForm affine);

// The input gradient of fused_forward (without pool) except the scale path (scale_backward adds that), and g_scale
// (C) when training (else empty). x, a, relu_bits and scale as the forward had them; site: training and relu.
std::vector<at::Tensor> fused_backward(const at::Tensor& x, const at::Tensor& a,
                                       const at::Tensor& relu_bits, const at::Tensor& scale,
                                       const at::Tensor& g_out, const PhiKernels& phi,
                                       const NoiseOptions& noise, const SiteOptions& site, AffineForm affine);

// g_s (C) of a pooled site: sum over the pooled map of g_pool p (p from fused_forward); the scale path's gradient
// needs it before the backward sweep, which can then add that path in the same pass.
at::Tensor pooled_scale_grad(const at::Tensor& g_pool, const at::Tensor& win_p);

// The whole input gradient of a pooled fused site (fused_forward with pool), the scale path included when g_f (B, C,
// 4, from site_scale_backward) is given: one sweep with g_mu and g_E1 in three-row rings like fused_backward, but the
// noise path's start comes from the winners' kept m and d (unpool_row_avx512) and each output row adds the scale
// path's masked stencils in the same loop as the E1 terms. With a fused BatchNorm (bn), also its backward sums.
at::Tensor fused_backward_pooled(const at::Tensor& mask, const at::Tensor& relu_bits,
                                 const at::Tensor& g_pool, const PooledWinners& winners,
                                 const at::Tensor& g_f, const PhiKernels& phi, BatchNormSums bn = {});

// gx += sum_j g_f[b, c, j] / (H W) * (K_j^T * [mask bit j]): the scale path's share of the input gradient, in place.
// With a fused BatchNorm (bn), also its backward sums, from each finished gx row (as fused_backward_pooled).
at::Tensor scale_backward(const at::Tensor& mask, const at::Tensor& g_f, const at::Tensor& kscale,
                          at::Tensor gx, BatchNormSums bn = {});

}  // namespace wb
#endif  // WB_HAS_AVX512_PATH
