// The site in two sweeps over the NHWC map, for any phi (its kernel gradients included) and any CPU: each sweep a
// torch.autograd.Function in workbench/_native.py, with a forward and a hand-written backward here.
//
// Sweep 1 reads h and writes r1 = relu(E1(h)) and its channel mean, and accumulates the scale features f (spatial
// means of relu(K_j * h)) plus one mask byte per element for the backward. The per-channel scale stays in PyTorch
// between the sweeps. Sweep 2 computes mu = E2(r1), draws eps in-kernel when none is given, and writes
// out = min(h (1 + k (s softplus(mu + eps) - 1)), clip).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "params.h"

namespace wb {

// What sweep 1's backward reads from its forward: the NHWC input x, mh = mean_c x (B, H, W) and the mask bytes.
struct Sweep1Saved {
  at::Tensor x, mh, mask;
};

// The gradients sweep 1's backward is given: of r1 (NHWC), of mr (B, H, W) and of f (B, C, 4; empty for none).
struct Sweep1Grads {
  at::Tensor r1, mr, f;
};

// Which gradients sweep 1's backward computes: h's, E1's kernels', the scale kernels'.
struct Sweep1Needs {
  bool x = false, e1 = false, scale = false;
};

// What sweep 2's backward reads from its forward: x, r1, mr, a = mu + eps (NHWC), the multiplier (channels_last) and
// the scale (C).
struct Sweep2Saved {
  at::Tensor x, r1, mr, a, mult, scale;
};

// Which gradients sweep 2's backward computes: h's direct term, r1's and mr's, the scale's, E2's kernels'.
struct Sweep2Needs {
  bool x = false, r1 = false, scale = false, e2 = false;
};

// r1 = relu(E1(h)), mr = mean_c r1, f[b,c,j] = mean_xy relu(K_j * h) (training), plus what the backward needs:
// mh = mean_c h and one mask byte per element (bits 0-3: K_j * h > 0, bit 4: E1 > 0). Returns r1, mr, f (empty when
// not training), mh, mask.
std::vector<at::Tensor> sweep1_forward(const at::Tensor& x, const EquivariantKernels& e1,
                                       const at::Tensor& kscale, bool training);

// grad wrt h of sweep 1, plus kernel gradients when asked. gx_init: sweep 2's direct term for h (accumulated into,
// saving autograd an add of two maps), or empty. Returns g_h, g_Kid1, g_Kall1, g_Kscale.
std::vector<at::Tensor> sweep1_backward(const Sweep1Saved& saved, const Sweep1Grads& grad,
                                        const EquivariantKernels& e1, const at::Tensor& kscale,
                                        Sweep1Needs need, const at::Tensor& gx_init);

// mu = E2(r1) (with mr = mean_c r1), a = mu + eps, z = softplus(a), m = 1 + k (s z - 1), out = min(h m, clip).
// eps from `noise` (drawn in-kernel when it has none). Returns out, m (channels_last tensors of their own) and a.
std::vector<at::Tensor> sweep2_forward(const at::Tensor& x, const at::Tensor& r1, const at::Tensor& mr,
                                       const at::Tensor& scale, const EquivariantKernels& e2,
                                       const NoiseOptions& noise);

// Returns g_x (direct term), g_r1, g_mr, g_scale, g_Kid2, g_Kall2 (the last three empty when not asked).
std::vector<at::Tensor> sweep2_backward(const Sweep2Saved& saved, const at::Tensor& g_out,
                                        const EquivariantKernels& e2, const NoiseOptions& noise, Sweep2Needs need);

}  // namespace wb
