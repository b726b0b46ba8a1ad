// The parameter structs of the sweeps and of the fused site: what each function is given, grouped by what it is,
// instead of long positional lists (bindings.cpp fills them from the Python call's tuples).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace wb {

// One equivariant layer of phi, E(h)_c = K_id * h_c + K_all * mean_c'(h_c'): its two (1, 1, 3, 3) kernels.
struct EquivariantKernels {
  at::Tensor id;
  at::Tensor all;
};

// phi's six tensors as the fused site reads them (phi.function_tensors()).
struct PhiKernels {
  EquivariantKernels e1;    // noise1: mu = E2(relu(E1(h)))
  EquivariantKernels e2;    // noise2
  at::Tensor scale;      // the four scale kernels K_j (4, 1, 3, 3)
  at::Tensor fc_weight;  // the scale's linear map (1, 10)
};

// The noise tail, m = 1 + k (s softplus(mu + eps) - 1) and out = min(h m, clip), and where its eps comes from.
struct NoiseOptions {
  at::Tensor eps;          // NHWC standard normals, or empty: drawn in-kernel from `seed`
  int64_t seed = 0;
  double coeff = 1.0;         // k
  std::optional<double> clip;  // none: no clip

  bool drawn() const { return !eps.defined() || eps.numel() == 0; }
  float k() const { return static_cast<float>(coeff); }
  // the clip as the rows' upper bound: +inf without one
  float clip_bound() const {
    return clip ? static_cast<float>(*clip) : std::numeric_limits<float>::infinity();
  }
};

// What a fused site computes, and whether it keeps what a backward reads.
struct SiteOptions {
  bool training = false;  // the scale from its features' batch statistics (running ones updated), else the running ones
  bool keep = false;      // a backward follows: keep the mask, the ReLU bits, a or the pool's winners
  bool relu = false;      // the layer's ReLU fused into the site
  bool pool = false;      // then its 2x2 max-pool (stride 2)
};

// The scale's inputs besides the features: s_c = sigmoid(w . [m_c, v_c, channel_ratio, size_ratio]), and how the
// running statistics move.
struct ScaleOptions {
  double channel_ratio = 0.0;  // C / channel_norm
  double size_ratio = 0.0;     // H / spatial_norm
  double momentum = 0.1;
  bool double_bessel = true;   // the running variance takes the batch variance times B / (B - 1) once more
};

// A training BatchNorm2d in front of the fused site, h being its output (its weight and bias are inputs of the
// autograd node of their own, so that they get gradients).
struct BatchNormOptions {
  at::Tensor running_mean;  // empty when it keeps no running statistics
  at::Tensor running_var;
  double eps = 1e-5;
  double momentum = 0.0;       // this step's factor for the running statistics (BatchNorm2d.forward's)
};

// A fused BatchNorm's backward sums, taken from each input-gradient row as a sweep writes it: sum g and
// sum g (x - mean) per channel into sums (2 C doubles). input: the BatchNorm's NHWC input; all null: no BatchNorm.
struct BatchNormSums {
  const float* input = nullptr;
  const float* mean = nullptr;
  double* sums = nullptr;

  explicit operator bool() const { return input != nullptr; }
};

}  // namespace wb
