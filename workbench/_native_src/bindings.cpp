// The Python module: each binding takes its arguments grouped as tuples, one tuple a parameter struct (params.h,
// sweeps.h, autograd.h), and fills the struct. The only translation unit that includes torch/python.h (pybind11
// and torch's Python bindings: the longest compile).
#include <torch/python.h>

#include <optional>
#include <string>
#include <tuple>

#include "autograd.h"
#include "common.h"
#include "params.h"
#include "sweeps.h"
#include "tensors.h"

namespace {

using torch::Tensor;
using namespace wb;

using KernelPair = std::tuple<Tensor, Tensor>;                                   // (K_id, K_all)
using NoiseTuple = std::tuple<Tensor, int64_t, double, std::optional<double>>;    // (eps or empty, seed, k, clip)
using TailTuple = std::tuple<double, std::optional<double>>;                      // (k, clip)

EquivariantKernels equivariant(const KernelPair& t) { return {std::get<0>(t), std::get<1>(t)}; }

NoiseOptions noise_options(const NoiseTuple& t) {
  NoiseOptions noise;
  std::tie(noise.eps, noise.seed, noise.coeff, noise.clip) = t;
  return noise;
}

// the noise tail's parameters for a backward (no eps, no seed)
NoiseOptions tail_options(const TailTuple& t) {
  NoiseOptions noise;
  std::tie(noise.coeff, noise.clip) = t;
  return noise;
}

std::vector<Tensor> sweep1_forward_py(const Tensor& x, const KernelPair& e1, const Tensor& kscale, bool training) {
  return sweep1_forward(x, equivariant(e1), kscale, training);
}

// saved: (x, mh, mask); grad: (g_r1, g_mr, g_f); need: (h, E1's kernels, the scale kernels)
std::vector<Tensor> sweep1_backward_py(const std::tuple<Tensor, Tensor, Tensor>& saved,
                                       const std::tuple<Tensor, Tensor, Tensor>& grad, const KernelPair& e1,
                                       const Tensor& kscale, const std::tuple<bool, bool, bool>& need,
                                       const Tensor& gx_init) {
  const auto& [x, mh, mask] = saved;
  const auto& [g_r1, g_mr, g_f] = grad;
  const auto& [need_x, need_e1, need_scale] = need;
  return sweep1_backward({x, mh, mask}, {g_r1, g_mr, g_f}, equivariant(e1), kscale, {need_x, need_e1, need_scale},
                         gx_init);
}

std::vector<Tensor> sweep2_forward_py(const Tensor& x, const Tensor& r1, const Tensor& mr, const Tensor& scale,
                                      const KernelPair& e2, const NoiseTuple& noise) {
  return sweep2_forward(x, r1, mr, scale, equivariant(e2), noise_options(noise));
}

// saved: (x, r1, mr, a, mult, scale); need: (h, r1 and mr, the scale, E2's kernels)
std::vector<Tensor> sweep2_backward_py(const std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>& saved,
                                       const Tensor& g_out, const KernelPair& e2, const TailTuple& tail,
                                       const std::tuple<bool, bool, bool, bool>& need) {
  const auto& [x, r1, mr, a, mult, scale] = saved;
  const auto& [need_x, need_r1, need_scale, need_e2] = need;
  return sweep2_backward({x, r1, mr, a, mult, scale}, g_out, equivariant(e2), tail_options(tail),
                         {need_x, need_r1, need_scale, need_e2});
}

#if WB_HAS_AVX512_PATH
// h, bn_weight, bn_bias: the node's differentiable inputs (empty tensors for a missing BatchNorm or affine part);
// phi: phi.function_tensors(); stats: the site's (running_mean, running_var); noise: (eps or empty, seed, k, clip);
// site: (training, keep, relu, pool); scale: (C / channel_norm, H / spatial_norm, momentum, double_bessel);
// batch_norm: None, or (running_mean, running_var, eps, momentum) of a training BatchNorm2d in front of the site.
std::vector<Tensor> fused_site_py(const Tensor& h, const Tensor& bn_weight, const Tensor& bn_bias,
                                  const std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>& phi,
                                  const std::tuple<Tensor, Tensor>& stats, const NoiseTuple& noise,
                                  const std::tuple<bool, bool, bool, bool>& site,
                                  const std::tuple<double, double, double, bool>& scale,
                                  const std::optional<std::tuple<Tensor, Tensor, double, double>>& batch_norm) {
  FusedSiteArgs args;
  const auto& [kid1, kall1, kid2, kall2, kscale, fc_weight] = phi;
  args.phi = {{kid1, kall1}, {kid2, kall2}, kscale, fc_weight};
  std::tie(args.running_mean, args.running_var) = stats;
  args.noise = noise_options(noise);
  std::tie(args.site.training, args.site.keep, args.site.relu, args.site.pool) = site;
  std::tie(args.scale.channel_ratio, args.scale.size_ratio, args.scale.momentum, args.scale.double_bessel) = scale;
  if (batch_norm) {
    BatchNormOptions bn;
    std::tie(bn.running_mean, bn.running_var, bn.eps, bn.momentum) = *batch_norm;
    args.batch_norm = bn;
  }
  return fused_site(h, bn_weight, bn_bias, args);
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused MetaPerturb perturbation-site kernels (NHWC float32, CPU)";
  m.def("sweep1_forward", &sweep1_forward_py,
        "sweep 1: (x, (K_id1, K_all1), K_scale, training) -> r1, mr, f, mh, mask");
  m.def("sweep1_backward", &sweep1_backward_py,
        "((x, mh, mask), (g_r1, g_mr, g_f), (K_id1, K_all1), K_scale, (need h, need E1, need scale), gx_init)");
  m.def("sweep2_forward", &sweep2_forward_py,
        "sweep 2: (x, r1, mr, scale, (K_id2, K_all2), (eps or empty, seed, k, clip)) -> out, multiplier, a");
  m.def("sweep2_backward", &sweep2_backward_py,
        "((x, r1, mr, a, multiplier, scale), g_out, (K_id2, K_all2), (k, clip), (need h, need r1, need scale, "
        "need E2))");
  m.def("draw", &draw, "n NHWC-linear normals of a seed (the in-kernel draw)");
  m.def("draw_seed", &draw_seed, "a 63-bit seed from the default CPU generator");
#if WB_HAS_AVX512_PATH
  m.def("fused_site", &fused_site_py,
        "the whole fused site as one autograd node: (out, scale, multiplier [mean, std]); see fused_site_py");
#endif
  m.def("isa", [] { return std::string(use_avx512() ? "avx512" : "generic"); }, "the row kernels in use");
  m.def("cpu_has_avx512", [] { return static_cast<bool>(WB_HAS_AVX512_PATH && cpu_has_avx512()); });
  m.def("set_isa", [](const std::string& isa) {
    TORCH_CHECK(isa == "generic" || isa == "avx512", "isa must be 'generic' or 'avx512', not '", isa, "'");
    TORCH_CHECK(isa == "generic" || (WB_HAS_AVX512_PATH && cpu_has_avx512()), "this CPU has no AVX-512 (F, BW, VL, DQ)");
    use_avx512() = isa == "avx512";
  }, "choose the row kernels: 'avx512' (where the CPU has it) or 'generic'");
  m.def("pool_release", &pool_release, "free the recycled map buffers; returns the bytes freed");
  m.def("pool_held", &pool_held, "bytes of recycled map buffers held for reuse");
}
