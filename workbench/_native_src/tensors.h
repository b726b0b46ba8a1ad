// Tensor plumbing shared by the sweeps and the fused site: the kernel's map buffers (recycled), checked NHWC
// geometry, phi's tensors as float arrays, and the draws that need torch's RNG or a tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "common.h"

namespace wb {

// An uninitialised map for the kernel's outputs (from the pool when large).
at::Tensor empty_map(at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat);

// (B, C, H, W) with channels_last strides over NHWC memory, as a tensor of its own (not a permuted view: autograd
// forbids in-place ops, such as the next layer's ReLU(inplace=True), on view outputs of a Function)
at::Tensor empty_channels_last(idx B, idx C, idx H, idx W);

// Free the recycled map buffers; returns the bytes freed. Maps in use are unaffected.
int64_t pool_release();

// Bytes of recycled map buffers held for reuse.
int64_t pool_held();

// The geometry of a contiguous float32 NHWC tensor (checked).
Geometry geometry(const at::Tensor& x_nhwc);

// t itself when it is float32 and contiguous (as phi's tensors and the scales are): no dispatcher call, which costs
// microseconds a tensor with the caches cold after a sweep; else a contiguous float32 copy
at::Tensor float_contiguous(const at::Tensor& t);

// A kernel's values (or any small tensor's) as floats.
std::vector<float> kernel9(const at::Tensor& k);

// g_f (B, C, 4) over H W, laid out (B, 4, C) for the channel loops
std::vector<float> scale_grad_rows(const at::Tensor& g_f, idx hw);

// The gradient to the per-channel scale from per-row partials (rows x C, in double so that the sum over rows does not
// depend on how the rows were split among threads), as a float (C) tensor.
at::Tensor sum_row_partials(const std::vector<double>& partials, idx rows, idx C);

// A 63-bit seed from torch's default CPU generator (the stream torch.manual_seed sets), without the tensor and the
// dispatch of a torch.randint: each site draws one a call.
int64_t draw_seed();

// The standalone draw (for tests of the generator): n NHWC-linear normals of `seed`.
at::Tensor draw(int64_t n, int64_t seed);

}  // namespace wb
