// The whole fused site for a frozen phi as one C++ autograd node: h -> (out, scale, [mean, std] of the multiplier).
// The forward is scale_prepass, site_scale_forward and fused_forward; the backward fused_backward(_pooled) with the
// scale statistics' backward (and scale_backward without pool). A node in C++ leaves no Python between the kernels,
// either way, which a Python autograd.Function around the same kernels paid for on every training step (Python glue
// and the engine's calls into Python).
// Differentiable once: a backward asked to build a graph stops with an error (the eager path is twice-differentiable).
// batch_norm: h is a training BatchNorm2d's output and the node takes its input instead (bn_weight and bn_bias may be
// empty, its running statistics empty when it keeps none): its batch statistics come from one pass over that input,
// h's rows are made from it as the sweeps read them (never written), its running statistics are updated with its
// momentum, and the backward takes BatchNorm's two sums from the gradient of h as its last sweep writes it and then
// applies BatchNorm's backward in place (one pass).
#include "autograd.h"

#if WB_HAS_AVX512_PATH
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>

#include "batch_norm.h"
#include "fused_site.h"
#include "tensors.h"

namespace wb {
namespace {

// The slots of the node's saved tensors; a slot the forward has no use for holds an undefined tensor. With pool the
// backward reads the windows' winners and what they keep (pooled maps) instead of h and a.
enum Saved : size_t {
  kX,            // h (NHWC), or a fused BatchNorm's input: without pool, or with a BatchNorm
  kA,            // mu + eps (NHWC), without pool
  kWinnerCode,   // the pooled winners (with pool)
  kWinnerM,
  kWinnerD,
  kWinnerP,
  kMask,         // the scale bits (training)
  kReluBits,     // E1 > 0
  kScale,        // s (C)
  kFeatures,     // f (B, C, 4) (training)
  kFeatureMean,  // their batch mean (C, 4)
  kKid1,
  kKall1,
  kKid2,
  kKall2,
  kKscale,
  kFcWeight,
  kBnMean,       // with a BatchNorm: its batch mean and 1 / std (C each), its weight and its affine form (2 C)
  kBnInvstd,
  kBnWeight,
  kBnAffine,
  kSavedSlots
};

// The node's tensor inputs, in order (needs_input_grad counts these only), and the slots of its arguments (`out` of
// the backward has one for each, the FusedSiteArgs too).
enum Input : size_t { kInputH, kInputBnWeight, kInputBnBias, kArguments };

struct FusedSiteFunction : public torch::autograd::Function<FusedSiteFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h,
                                                const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                                const FusedSiteArgs& args) {
    const SiteOptions& site = args.site;
    const bool batch_norm = args.batch_norm.has_value();
    const auto x = h.detach().permute({0, 2, 3, 1}).contiguous();  // NHWC: no copy for a channels_last map
    TORCH_CHECK(!batch_norm || site.training, "a BatchNorm is fused into a site of a training pass only");
    BatchNormForward bn;
    if (batch_norm) bn = batch_norm_forward(x, bn_weight, bn_bias, *args.batch_norm, h.sizes());
    const AffineForm affine = batch_norm ? bn.form() : AffineForm{};
    const Prepass pre = scale_prepass(x, args.phi.scale, site, affine);
    const SiteScale sc = site_scale_forward(pre.features, args.running_mean, args.running_var, args.phi.fc_weight,
                                            args.scale);
    NoiseOptions noise = args.noise;
    if (!noise.drawn()) noise.eps = noise.eps.detach().to(at::kFloat).permute({0, 2, 3, 1}).contiguous();
    const FusedForward fw = fused_forward(x, pre.mh, sc.scale, args.phi, noise, site, affine);
    ctx->saved_data["noise_coeff"] = noise.coeff;
    ctx->saved_data["has_clip"] = noise.clip.has_value();
    ctx->saved_data["clip"] = noise.clip.value_or(0.0);
    ctx->saved_data["training"] = site.training;
    ctx->saved_data["relu"] = site.relu;
    ctx->saved_data["pool"] = site.pool;
    ctx->saved_data["batch_norm"] = batch_norm;
    ctx->saved_data["shape"] = std::vector<int64_t>(x.sizes().begin(), x.sizes().end());
    std::vector<at::Tensor> saved(kSavedSlots);
    if (!site.pool || batch_norm) saved[kX] = x;  // BatchNorm's backward reads its input (NHWC: a copy when h was
                                                  // not channels_last)
    if (site.pool) {
      saved[kWinnerCode] = fw.winners.code;
      saved[kWinnerM] = fw.winners.m;
      saved[kWinnerD] = fw.winners.d;
      saved[kWinnerP] = fw.winners.p;
    } else {
      saved[kA] = fw.a;
    }
    saved[kMask] = pre.mask;
    saved[kReluBits] = fw.relu_bits;
    saved[kScale] = sc.scale;
    saved[kFeatures] = pre.features;
    saved[kFeatureMean] = sc.mean;
    saved[kKid1] = args.phi.e1.id;
    saved[kKall1] = args.phi.e1.all;
    saved[kKid2] = args.phi.e2.id;
    saved[kKall2] = args.phi.e2.all;
    saved[kKscale] = args.phi.scale;
    saved[kFcWeight] = args.phi.fc_weight;
    if (batch_norm) {
      saved[kBnMean] = bn.mean;
      saved[kBnInvstd] = bn.invstd;
      saved[kBnWeight] = bn_weight;
      saved[kBnAffine] = at::tensor(bn.affine);  // without pool the backward remakes h's rows from x
    }
    ctx->save_for_backward(saved);
    if (site.training)
      ctx->mark_non_differentiable({fw.stats});
    else
      ctx->mark_non_differentiable({fw.stats, sc.scale});
    return {fw.out, sc.scale, fw.stats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "the fused perturbation site is differentiable once; for higher-order gradients set the site's "
                "fused = False (the eager path)");
    torch::autograd::variable_list out(kArguments + 1);
    const bool batch_norm = ctx->saved_data["batch_norm"].toBool();
    const bool need_bn_weight = batch_norm && ctx->needs_input_grad(kInputBnWeight),
               need_bn_bias = batch_norm && ctx->needs_input_grad(kInputBnBias);
    if (!ctx->needs_input_grad(kInputH) && !need_bn_weight && !need_bn_bias) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &mask = saved[kMask], &relu_bits = saved[kReluBits], &scale = saved[kScale],
                     &features = saved[kFeatures], &mean = saved[kFeatureMean], &fc_weight = saved[kFcWeight];
    const PhiKernels phi{{saved[kKid1], saved[kKall1]}, {saved[kKid2], saved[kKall2]}, saved[kKscale], fc_weight};
    TORCH_CHECK(relu_bits.numel() > 0, "the fused perturbation site's forward kept nothing for a backward (it ran "
                "without keep: no input needed a gradient when it ran)");
    const bool training = ctx->saved_data["training"].toBool();
    const auto shape = ctx->saved_data["shape"].toIntVector();  // B, H, W, C
    const at::Tensor& g_out = grads[0];
    const at::Tensor& g_scale_out = grads[1];
    const at::Tensor& x = saved[kX];  // h, or a fused BatchNorm's input (NHWC)
    std::vector<double> sums(batch_norm ? 2 * shape[3] : 0, 0.0);
    const BatchNormSums bn_sums =
        batch_norm ? BatchNormSums{x.data_ptr<float>(), saved[kBnMean].data_ptr<float>(), sums.data()}
                   : BatchNormSums{};
    at::Tensor gx;
    if (ctx->saved_data["pool"].toBool()) {
      const auto g_pool = g_out.defined() ? g_out.permute({0, 2, 3, 1}).contiguous()
                                          : at::zeros({shape[0], shape[1] / 2, shape[2] / 2, shape[3]});
      at::Tensor g_features = at::empty({0});
      if (training) {
        auto g_scale = pooled_scale_grad(g_pool, saved[kWinnerP]);
        if (g_scale_out.defined()) g_scale = g_scale.add(g_scale_out);
        g_features = site_scale_backward(features, mean, scale, fc_weight, g_scale);
      }
      // the gradient of h, with BatchNorm's two sums taken as it is written
      const PooledWinners winners{saved[kWinnerCode], saved[kWinnerM], saved[kWinnerD], saved[kWinnerP]};
      gx = fused_backward_pooled(mask, relu_bits, g_pool, winners, g_features, phi, bn_sums);
    } else {
      const at::Tensor& a = saved[kA];
      const AffineForm affine =  // h = A x + B
          batch_norm ? AffineForm{saved[kBnAffine].data_ptr<float>(), saved[kBnAffine].data_ptr<float>() + shape[3]}
                     : AffineForm{};
      at::Tensor g_scale;
      if (g_out.defined()) {
        NoiseOptions noise;
        noise.coeff = ctx->saved_data["noise_coeff"].toDouble();
        if (ctx->saved_data["has_clip"].toBool()) noise.clip = ctx->saved_data["clip"].toDouble();
        SiteOptions site;
        site.training = training;
        site.relu = ctx->saved_data["relu"].toBool();
        auto r = fused_backward(x, a, relu_bits, scale, g_out.permute({0, 2, 3, 1}).contiguous(), phi, noise, site,
                                affine);
        gx = r[0];
        g_scale = r[1];
      } else {  // a loss on the scale alone
        gx = empty_channels_last(shape[0], shape[3], shape[1], shape[2]).zero_();
        g_scale = at::zeros({shape[3]});
      }
      if (training) {
        if (g_scale_out.defined()) g_scale = g_scale.add(g_scale_out);
        auto g_features = site_scale_backward(features, mean, scale, fc_weight, g_scale);
        // adds the scale path in place (the last sweep: with BatchNorm, it takes BatchNorm's sums too)
        scale_backward(mask, g_features, phi.scale, gx, bn_sums);
      }
    }
    if (batch_norm) {  // through BatchNorm, in place
      auto g_bn = batch_norm_backward_in_place(gx, x, saved[kBnMean], saved[kBnInvstd], saved[kBnWeight], sums);
      if (need_bn_weight) out[kInputBnWeight] = g_bn.first;
      if (need_bn_bias) out[kInputBnBias] = g_bn.second;
    }
    out[kInputH] = gx;
    return out;
  }
};

}  // namespace

std::vector<at::Tensor> fused_site(const at::Tensor& h, const at::Tensor& bn_weight,
                                   const at::Tensor& bn_bias, const FusedSiteArgs& args) {
  return FusedSiteFunction::apply(h, bn_weight, bn_bias, args);
}

}  // namespace wb
#endif  // WB_HAS_AVX512_PATH
