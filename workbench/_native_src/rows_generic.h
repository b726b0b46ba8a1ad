// The rows of the two sweeps in plain C++ that the compiler vectorises (any CPU): 3x3 stencil rows, the weight
// gradients of a stencil, and the elementwise rows of the ReLU, the noise tail and their backwards.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace wb {

// out (=, or += with kAccumulate) sum_{dy, dx} K[3 dy + dx] * rows[dy][x + dx - 1, c]: one 3x3 stencil row in a
// single pass (9 loads, 1 store per element). A null row is zero padding (read from a zero row).
template <bool kAccumulate = false>
void stencil_row(float* __restrict out, const float* const rows[3], const float* K, idx W, idx C) {
  const idx n = W * C;
  static thread_local std::vector<float> zeros;
  if (static_cast<idx>(zeros.size()) < n) zeros.assign(static_cast<size_t>(n), 0.0f);
  const float* __restrict r0 = rows[0] ? rows[0] : zeros.data();
  const float* __restrict r1 = rows[1] ? rows[1] : zeros.data();
  const float* __restrict r2 = rows[2] ? rows[2] : zeros.data();
  const float k00 = K[0], k01 = K[1], k02 = K[2], k10 = K[3], k11 = K[4], k12 = K[5], k20 = K[6], k21 = K[7],
              k22 = K[8];
  if (W == 1) {
    for (idx i = 0; i < n; ++i) {
      const float v = k01 * r0[i] + k11 * r1[i] + k21 * r2[i];
      out[i] = kAccumulate ? out[i] + v : v;
    }
    return;
  }
  for (idx i = 0; i < C; ++i) {
    const float v = k01 * r0[i] + k02 * r0[i + C] + k11 * r1[i] + k12 * r1[i + C] + k21 * r2[i] + k22 * r2[i + C];
    out[i] = kAccumulate ? out[i] + v : v;
  }
  for (idx i = C; i < n - C; ++i) {
    const float v = k00 * r0[i - C] + k01 * r0[i] + k02 * r0[i + C] + k10 * r1[i - C] + k11 * r1[i] +
                    k12 * r1[i + C] + k20 * r2[i - C] + k21 * r2[i] + k22 * r2[i + C];
    out[i] = kAccumulate ? out[i] + v : v;
  }
  for (idx i = n - C; i < n; ++i) {
    const float v = k00 * r0[i - C] + k01 * r0[i] + k10 * r1[i - C] + k11 * r1[i] + k20 * r2[i - C] + k21 * r2[i];
    out[i] = kAccumulate ? out[i] + v : v;
  }
}

// acc[dx] += sum_i g[i] * in[i + (dx-1) C] (zero padded): the weight gradient of one kernel row
inline void hcorr_acc(const float* __restrict g, const float* __restrict in, idx W, idx C, double acc[3]) {
  const idx n = W * C;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s0)
  for (idx i = C; i < n; ++i) s0 += g[i] * in[i - C];
#pragma omp simd reduction(+ : s1)
  for (idx i = 0; i < n; ++i) s1 += g[i] * in[i];
#pragma omp simd reduction(+ : s2)
  for (idx i = 0; i < n - C; ++i) s2 += g[i] * in[i + C];
  acc[0] += s0; acc[1] += s1; acc[2] += s2;
}

inline void corr_row(const float* g, const float* const rows[3], idx W, idx C, double acc[9]) {
  for (int dy = 0; dy < 3; ++dy)
    if (rows[dy]) hcorr_acc(g, rows[dy], W, C, acc + 3 * dy);
}

inline void flip9(const float* K, float* out) { for (int t = 0; t < 9; ++t) out[t] = K[8 - t]; }

// Image b's scale features f[b, c, j] = acc[j C + c] * inv (acc: its relu sums over the map, in double)
inline void store_image_features(const std::vector<double>& acc, idx b, idx C, double inv, float* __restrict f) {
  for (int j = 0; j < kScaleKernels; ++j)
    for (idx c = 0; c < C; ++c) f[(b * C + c) * kScaleKernels + j] = static_cast<float>(acc[j * C + c] * inv);
}

// out = relu(e + pix[x]), mask = relu bit, mean[x] = mean_c out
void relu_row(const float* __restrict e, const float* __restrict pix, float* __restrict out,
              int32_t* __restrict mask, float* __restrict mean, idx W, idx C);

// acc[c] += sum_x relu(s[x, c]); mask |= bit where s > 0
void relu_sum_row(const float* __restrict s, float* __restrict acc, int32_t* __restrict mask, int32_t bit, idx W,
                  idx C);

// mean[x] = mean_c in[x, c]
void channel_mean_row(const float* __restrict in, float* __restrict mean, idx W, idx C);

// the noise tail for one row: a = mu + pix[x] + eps, m = 1 + k (s softplus(a) - 1), out = min(h m, clip) (no clip
// without has_clip); writes out, mult and a_out
void noise_tail_row(const float* __restrict h, const float* __restrict mu, const float* __restrict pix,
                    const float* __restrict eps, const float* __restrict scale, float* __restrict out,
                    float* __restrict mult, float* __restrict a_out, float k, bool has_clip, float clip, idx W, idx C);

// backward of the noise tail for one row: g_x = g m (direct term), g_mu, its channel sums, and acc[c] += g_m z.
// Everything is always written (callers pass scratch rows for what they do not need): no branches in the loop.
void noise_tail_backward_row(const float* __restrict h, const float* __restrict mult, const float* __restrict a,
                             const float* __restrict g_out, const float* __restrict scale, float* __restrict g_x,
                             float* __restrict g_mu, float* __restrict g_mu_sum, float* __restrict acc, float k,
                             bool has_clip, float clip, idx W, idx C);

// g_e = relu mask * (g_r1 + g_mr[x] / C), gsum[x] = sum_c g_e
void relu_backward_row(const int32_t* __restrict mask, const float* __restrict g_r1, const float* __restrict g_mr,
                       float* __restrict g_e, float* __restrict gsum, idx W, idx C);

// dst[x, c] = bit set ? gf[c] : 0
void expand_row(const int32_t* __restrict mask, const float* __restrict gf, int32_t bit, float* __restrict dst, idx W,
                idx C);

// out += pix[x] * scale (broadcast over channels)
void add_pixel_row(float* __restrict out, const float* __restrict pix, float scale, idx W, idx C);

// the mask words as the bytes kept for the backward, and back
void pack_mask(const int32_t* __restrict in, uint8_t* __restrict out, idx n);

void unpack_mask(const uint8_t* __restrict in, int32_t* __restrict out, idx n);

}  // namespace wb
