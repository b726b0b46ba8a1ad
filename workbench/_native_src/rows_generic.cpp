// The elementwise rows of the generic two sweeps (declared, with what each computes, in rows_generic.h).
#include "rows_generic.h"

#include <limits>

#include "vector_math.h"

namespace wb {

void relu_row(const float* __restrict e, const float* __restrict pix, float* __restrict out,
              int32_t* __restrict mask, float* __restrict mean, idx W, idx C) {
  const float inv_c = 1.0f / static_cast<float>(C);
  for (idx xx = 0; xx < W; ++xx) {
    const float p = pix[xx];
    const idx o = xx * C;
#pragma omp simd simdlen(16)
    for (idx c = 0; c < C; ++c) {
      const float v = e[o + c] + p;
      const float r = v > 0.f ? v : 0.f;
      out[o + c] = r;
      mask[o + c] = v > 0.f ? kReluBit : 0;
    }
    mean[xx] = channel_total(out + o, C) * inv_c;
  }
}

void relu_sum_row(const float* __restrict s, float* __restrict acc, int32_t* __restrict mask, int32_t bit, idx W,
                  idx C) {
  for (idx xx = 0; xx < W; ++xx) {
    const idx o = xx * C;
#pragma omp simd simdlen(16)
    for (idx c = 0; c < C; ++c) {
      const float v = s[o + c];
      const bool pos = v > 0.f;
      acc[c] += pos ? v : 0.f;
      mask[o + c] |= pos ? bit : 0;
    }
  }
}

void channel_mean_row(const float* __restrict in, float* __restrict mean, idx W, idx C) {
  const float inv_c = 1.0f / static_cast<float>(C);
  for (idx xx = 0; xx < W; ++xx) mean[xx] = channel_total(in + xx * C, C) * inv_c;
}

void noise_tail_row(const float* __restrict h, const float* __restrict mu, const float* __restrict pix,
                    const float* __restrict eps, const float* __restrict scale, float* __restrict out,
                    float* __restrict mult, float* __restrict a_out, float k, bool has_clip, float clip, idx W, idx C) {
  const float cl = has_clip ? clip : std::numeric_limits<float>::infinity();
  for (idx xx = 0; xx < W; ++xx) {
    const float p = pix[xx];
    const idx o = xx * C;
#pragma omp simd simdlen(16)
    for (idx c = 0; c < C; ++c) {
      const float av = mu[o + c] + p + eps[o + c];
      const float z = softplus(av);
      const float m = 1.0f + k * (scale[c] * z - 1.0f);
      const float v = h[o + c] * m;
      a_out[o + c] = av;
      mult[o + c] = m;
      out[o + c] = v < cl ? v : cl;
    }
  }
}

void noise_tail_backward_row(const float* __restrict h, const float* __restrict mult, const float* __restrict a,
                             const float* __restrict g_out, const float* __restrict scale, float* __restrict g_x,
                             float* __restrict g_mu, float* __restrict g_mu_sum, float* __restrict acc, float k,
                             bool has_clip, float clip, idx W, idx C) {
  const float cl = has_clip ? clip : std::numeric_limits<float>::infinity();
  for (idx xx = 0; xx < W; ++xx) {
    const idx o = xx * C;
#pragma omp simd simdlen(16)
    for (idx c = 0; c < C; ++c) {
      const float hv = h[o + c], m = mult[o + c];
      // clamp(max=clip) passes the gradient where h m <= clip (torch's convention at equality)
      const float go = (hv * m <= cl) ? g_out[o + c] : 0.f;
      const float gm = go * hv * k;
      const float av = a[o + c];
      const float e = fast_exp(-std::fabs(av));
      const float r = 1.0f / (1.0f + e);
      const float sig = av >= 0.0f ? r : e * r;
      g_x[o + c] = go * m;
      acc[c] += gm * ((av > 0.0f ? av : 0.0f) + fast_log1p_unit(e));
      const float gmu = gm * scale[c] * sig;
      g_mu[o + c] = gmu;
    }
    g_mu_sum[xx] = channel_total(g_mu + o, C);
  }
}

void relu_backward_row(const int32_t* __restrict mask, const float* __restrict g_r1, const float* __restrict g_mr,
                       float* __restrict g_e, float* __restrict gsum, idx W, idx C) {
  const float inv_c = 1.0f / static_cast<float>(C);
  for (idx xx = 0; xx < W; ++xx) {
    const idx o = xx * C;
    const float add = g_mr[xx] * inv_c;
#pragma omp simd simdlen(16)
    for (idx c = 0; c < C; ++c) {
      const float v = (mask[o + c] & kReluBit) ? g_r1[o + c] + add : 0.f;
      g_e[o + c] = v;
    }
    gsum[xx] = channel_total(g_e + o, C);
  }
}

void expand_row(const int32_t* __restrict mask, const float* __restrict gf, int32_t bit, float* __restrict dst, idx W,
                idx C) {
  for (idx xx = 0; xx < W; ++xx) {
    const idx o = xx * C;
#pragma omp simd simdlen(16)
    for (idx c = 0; c < C; ++c) dst[o + c] = (mask[o + c] & bit) ? gf[c] : 0.f;
  }
}

void add_pixel_row(float* __restrict out, const float* __restrict pix, float scale, idx W, idx C) {
  for (idx xx = 0; xx < W; ++xx) {
    const float p = pix[xx] * scale;
#pragma omp simd simdlen(16)
    for (idx c = 0; c < C; ++c) out[xx * C + c] += p;
  }
}

void pack_mask(const int32_t* __restrict in, uint8_t* __restrict out, idx n) {
  for (idx i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(in[i]);
}

void unpack_mask(const uint8_t* __restrict in, int32_t* __restrict out, idx n) {
  for (idx i = 0; i < n; ++i) out[i] = in[i];
}

}  // namespace wb
