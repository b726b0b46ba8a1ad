// Scalar vector math for the generic rows and the noise draw: branch-free polynomials that auto-vectorise, and a
// channel sum that vectorises too.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "common.h"

namespace wb {

// Branch-free polynomial exp/log/sin/cos (Cephes single precision) so loops over them auto-vectorise; libm calls
// would not, and the noise draw and softplus touch every element.
__attribute__((always_inline)) inline float bits_to_float(uint32_t b) { return std::bit_cast<float>(b); }
__attribute__((always_inline)) inline uint32_t float_to_bits(float f) { return std::bit_cast<uint32_t>(f); }

// exp(x) for x <= 88: the exponent is clamped in integers (float min/max with NaN semantics would not vectorise),
// so results below 2^-126 come out as about 1e-38 instead of 0 (harmless for softplus and sigmoid).
__attribute__((always_inline)) inline float fast_exp(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500E-4f;
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * z + x + 1.0f;
  int32_t ni = static_cast<int32_t>(n);
  ni = ni < -126 ? -126 : ni;
  ni = ni > 127 ? 127 : ni;
  return y * bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
}

// log of a positive normal float
__attribute__((always_inline)) inline float fast_log(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xff) - 126);
  float m = bits_to_float((bits & 0x807fffffu) | 0x3f000000u);  // in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * z * m;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// log(1 + e) for e in [0, 1], accurate for tiny e: the rounding error of u = 1 + e is compensated to first order
// (fast_log(1) is exactly 0, so e below half an ulp of 1 comes out as e). Branch-free, so it vectorises.
__attribute__((always_inline)) inline float fast_log1p_unit(float e) {
  const float u = 1.0f + e;
  return fast_log(u) + (e - (u - 1.0f)) / u;
}

__attribute__((always_inline)) inline float softplus(float a) {
  const float e = fast_exp(-std::fabs(a));
  return (a > 0.0f ? a : 0.0f) + fast_log1p_unit(e);
}
__attribute__((always_inline)) inline float sigmoid_of(float a) {
  const float e = fast_exp(-std::fabs(a));
  const float r = 1.0f / (1.0f + e);
  return a >= 0.0f ? r : e * r;
}

// sum of p[0..C) in 16 lanes and a tree: an `omp simd reduction` over one pixel's channels compiles (gcc) to a
// serial sum of the vector lanes through the stack, which cost more than the stencils it closes
__attribute__((always_inline)) inline float channel_total(const float* __restrict p, idx C) {
  float lane[16] = {};
  idx c = 0;
  for (; c + 16 <= C; c += 16)
    for (int l = 0; l < 16; ++l) lane[l] += p[c + l];
  float tail = 0.f;
  for (; c < C; ++c) tail += p[c];
  for (int w = 8; w > 0; w >>= 1)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0] + tail;
}

}  // namespace wb
