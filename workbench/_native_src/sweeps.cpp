// The two sweeps (declared, with what each computes, in sweeps.h): the generic rows for any CPU, the AVX-512 rows
// where use_avx512() says so.
#include "sweeps.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>

#include "noise.h"
#include "rings.h"
#include "rows_avx512.h"
#include "rows_generic.h"
#include "tensors.h"

namespace wb {
namespace {

// (B H, 4, C) per-row relu sums -> (B, C, 4) spatial means, summed over rows in double (size independent)
at::Tensor features_from_row_sums(const at::Tensor& fpart, idx B, idx H, idx W, idx C) {
  auto f = at::empty({B, C, kScaleKernels});
  const float* src = fpart.data_ptr<float>();
  float* dst = f.data_ptr<float>();
  const double inv = 1.0 / static_cast<double>(H * W);
  at::parallel_for(0, B, 1, [&](idx b0, idx b1) {
    std::vector<double> acc(static_cast<size_t>(kScaleKernels * C));
    for (idx b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (idx y = 0; y < H; ++y) {
        const float* row = src + (b * H + y) * kScaleKernels * C;
        for (idx i = 0; i < kScaleKernels * C; ++i) acc[i] += row[i];
      }
      store_image_features(acc, b, C, inv, dst);
    }
  });
  return f;
}

}  // namespace

// ================================================================================================== sweep 1
std::vector<at::Tensor> sweep1_forward(const at::Tensor& x, const EquivariantKernels& e1,
                                       const at::Tensor& kscale, bool training) {
  const at::Tensor &kid = e1.id, &kall = e1.all;
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  const auto Kid = kernel9(kid), Kall = kernel9(kall);
  const auto Ks = training ? kernel9(kscale) : std::vector<float>();
  auto opts = x.options();
  auto r1 = empty_map(x.sizes());
  auto mh = at::empty({g.B, g.H, g.W}, opts);
  auto mr = at::empty({g.B, g.H, g.W}, opts);
  auto mask = empty_map({g.B, g.H, g.W, g.C}, at::kByte);
  auto fpart = training ? at::empty({rows_total, kScaleKernels, g.C}, opts) : at::empty({0}, opts);
  const float* xp = x.data_ptr<float>();
  float* r1p = r1.data_ptr<float>();
  float* mhp = mh.data_ptr<float>();
  float* mrp = mr.data_ptr<float>();
  uint8_t* mp = mask.data_ptr<uint8_t>();
  float* fp = training ? fpart.data_ptr<float>() : nullptr;

  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    for (idx r = r0; r < r1_; ++r) channel_mean_row(xp + r * rw, mhp + r * g.W, g.W, g.C);
  });
  const bool avx512 = use_avx512();
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    std::vector<float> e(avx512 ? 0 : rw), s(avx512 ? 0 : rw), pix(g.W);
    std::vector<int32_t> bits(avx512 ? 0 : rw);
    for (idx r = r0; r < r1_; ++r) {
      const idx b = r / g.H, y = r % g.H;
      const float *hrows[3], *mrows[3];
      neighbours(xp, g, b, y, rw, hrows);
      neighbours(mhp, g, b, y, g.W, mrows);
      stencil_row(pix.data(), mrows, Kall.data(), g.W, 1);
#if WB_HAS_AVX512_PATH
      if (avx512) {
        float* fsum = training ? fp + r * kScaleKernels * g.C : nullptr;
        if (training)
          sweep1_row_avx512<true>(hrows, pix.data(), Kid.data(), Ks.data(), g.W, g.C, r1p + r * rw, mp + r * rw,
                                  mrp + r * g.W, fsum);
        else
          sweep1_row_avx512<false>(hrows, pix.data(), Kid.data(), nullptr, g.W, g.C, r1p + r * rw, mp + r * rw,
                                   mrp + r * g.W, nullptr);
        continue;
      }
#endif
      stencil_row(e.data(), hrows, Kid.data(), g.W, g.C);
      relu_row(e.data(), pix.data(), r1p + r * rw, bits.data(), mrp + r * g.W, g.W, g.C);
      if (training) {
        for (int j = 0; j < kScaleKernels; ++j) {
          stencil_row(s.data(), hrows, Ks.data() + 9 * j, g.W, g.C);
          float* acc = fp + (r * kScaleKernels + j) * g.C;
          std::fill(acc, acc + g.C, 0.f);
          relu_sum_row(s.data(), acc, bits.data(), 1 << j, g.W, g.C);
        }
      }
      pack_mask(bits.data(), mp + r * rw, rw);
    }
  });
  at::Tensor f;
  if (training) {
    f = features_from_row_sums(fpart, g.B, g.H, g.W, g.C);
  } else {
    f = at::empty({0}, opts);
  }
  return {r1, mr, f, mh, mask};
}

std::vector<at::Tensor> sweep1_backward(const Sweep1Saved& saved, const Sweep1Grads& grad,
                                        const EquivariantKernels& e1, const at::Tensor& kscale,
                                        Sweep1Needs need, const at::Tensor& gx_init) {
  const at::Tensor &x = saved.x, &mh = saved.mh, &mask = saved.mask;
  const at::Tensor &g_r1 = grad.r1, &g_mr = grad.mr, &g_f = grad.f;
  const at::Tensor &kid = e1.id, &kall = e1.all;
  const bool need_x = need.x, need_k1 = need.e1, need_ks = need.scale;
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  const bool with_scale = g_f.numel() > 0;
  float Kid[9], Kall[9];
  flip9(kernel9(kid).data(), Kid);
  flip9(kernel9(kall).data(), Kall);
  std::vector<float> Ks(9 * kScaleKernels, 0.f);
  if (with_scale) {
    const auto k = kernel9(kscale);
    for (int j = 0; j < kScaleKernels; ++j) flip9(k.data() + 9 * j, Ks.data() + 9 * j);
  }
  auto opts = x.options();
  const float* xp = x.data_ptr<float>();
  const float* mhp = mh.data_ptr<float>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const float* grp = g_r1.data_ptr<float>();
  const float* gmrp = g_mr.data_ptr<float>();
  const auto gf = with_scale ? scale_grad_rows(g_f, g.H * g.W) : std::vector<float>();
  const float* gfp = with_scale ? gf.data() : nullptr;

  const float inv_c = 1.0f / static_cast<float>(g.C);

  // gx_init (the direct term g * m from sweep 2) is accumulated into, saving autograd an add of two maps
  const bool accumulate = need_x && gx_init.numel() == x.numel();
  // a (B, C, H, W) channels_last tensor of its own, not a permuted view: autograd accumulates a view's gradient
  // out of place (a full extra pass per block whose input also feeds a shortcut)
  auto gx = accumulate ? gx_init : need_x ? empty_channels_last(g.B, g.C, g.H, g.W) : at::empty({0}, opts);
  float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
  const int n_acc = 18 + 9 * kScaleKernels;  // Kid, Kall, K_j
  std::vector<double> kacc(static_cast<size_t>(rows_total) * ((need_k1 || need_ks) ? n_acc : 0), 0.0);
  // the AVX-512 rows read the mask bytes in place of expanded maps; they do not compute phi's kernel gradients
  const bool avx512 = use_avx512() && !need_k1 && !need_ks;
  const bool expand = with_scale && !avx512;
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    // Per image row, computed once into a ring of three slots (slot = row index mod 3) as the sweep moves down:
    // g_E1 = relu mask * (g_r1 + g_mr / C), its channel sums, and g_S_j = [K_j * h > 0] * g_f[b, c, j] / (H W).
    std::vector<float> pix(g.W), ge(3 * rw), gs(3 * g.W);
    std::vector<int32_t> bits(rw);
    std::vector<float> expanded(expand ? 3 * kScaleKernels * rw : 0);
    RowRing ring;
#if WB_HAS_AVX512_PATH
    PatternRing patterns(avx512 && with_scale ? rw : 0);
#endif
    for (idx r = r0; r < r1_; ++r) {
      const idx b = r / g.H, y = r % g.H;
      auto produce = [&](idx row, int slot) {
        unpack_mask(mp + row * rw, bits.data(), rw);
        relu_backward_row(bits.data(), grp + row * rw, gmrp + row * g.W, ge.data() + slot * rw,
                          gs.data() + slot * g.W, g.W, g.C);
        if (expand)
          for (int j = 0; j < kScaleKernels; ++j)
            expand_row(bits.data(), gfp + (b * kScaleKernels + j) * g.C, 1 << j,
                       expanded.data() + (slot * kScaleKernels + j) * rw, g.W, g.C);
      };
      const float *grows[3], *srows[3], *hrows[3], *mrows[3];
      const float* erows[kScaleKernels][3];
      int slots[3];
      ring.window(b, y, g.H, produce, ge.data(), rw, gs.data(), g.W, grows, srows, slots);
      for (int dy = 0; dy < 3; ++dy)
        for (int j = 0; j < kScaleKernels; ++j)
          erows[j][dy] = slots[dy] >= 0 && expand ? expanded.data() + (slots[dy] * kScaleKernels + j) * rw : nullptr;
      if (need_x) {
        float* out = gxp + r * rw;
#if WB_HAS_AVX512_PATH
        if (avx512) {
          const uint32_t* prows[3] = {nullptr, nullptr, nullptr};
          if (with_scale) patterns.window(mp, g, b, y, prows);
          stencil_row(pix.data(), srows, Kall, g.W, 1);
          sweep1_backward_row_avx512(out, accumulate ? out : nullptr, grows, prows, pix.data(), Kid, Ks.data(),
                                     with_scale ? gfp + b * kScaleKernels * g.C : nullptr, g.W, g.C);
          continue;
        }
#endif
        if (accumulate)
          stencil_row<true>(out, grows, Kid, g.W, g.C);
        else
          stencil_row(out, grows, Kid, g.W, g.C);
        stencil_row(pix.data(), srows, Kall, g.W, 1);
        add_pixel_row(out, pix.data(), inv_c, g.W, g.C);
        if (with_scale)
          for (int j = 0; j < kScaleKernels; ++j) stencil_row<true>(out, erows[j], Ks.data() + 9 * j, g.W, g.C);
      }
      if (need_ks && with_scale) {
        double* acc = kacc.data() + r * n_acc;
        neighbours(xp, g, b, y, rw, hrows);
        for (int j = 0; j < kScaleKernels; ++j) corr_row(erows[j][1], hrows, g.W, g.C, acc + 18 + 9 * j);
      }
      if (need_k1) {
        double* acc = kacc.data() + r * n_acc;
        neighbours(xp, g, b, y, rw, hrows);
        neighbours(mhp, g, b, y, g.W, mrows);
        corr_row(grows[1], hrows, g.W, g.C, acc);
        corr_row(srows[1], mrows, g.W, 1, acc + 9);
      }
    }
  });
  auto sums = at::zeros({n_acc}, at::dtype(at::kDouble));
  if (need_k1 || need_ks) {
    double* sp = sums.data_ptr<double>();
    for (idx r = 0; r < rows_total; ++r)
      for (int t = 0; t < n_acc; ++t) sp[t] += kacc[r * n_acc + t];
  }
  auto sf = sums.to(at::kFloat);
  return {gx, sf.slice(0, 0, 9).view({1, 1, 3, 3}).clone(), sf.slice(0, 9, 18).view({1, 1, 3, 3}).clone(),
          sf.slice(0, 18, n_acc).view({kScaleKernels, 1, 3, 3}).clone()};
}

// ================================================================================================== sweep 2
std::vector<at::Tensor> sweep2_forward(const at::Tensor& x, const at::Tensor& r1, const at::Tensor& mr,
                                       const at::Tensor& scale, const EquivariantKernels& e2,
                                       const NoiseOptions& noise) {
  const at::Tensor &kid = e2.id, &kall = e2.all, &eps = noise.eps;
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  const auto Kid = kernel9(kid), Kall = kernel9(kall);
  auto s = float_contiguous(scale);
  const float* sp = s.data_ptr<float>();
  const bool drawn = eps.numel() == 0;
  const float* epsp = drawn ? nullptr : eps.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* rp = r1.data_ptr<float>();
  const float* mrp = mr.data_ptr<float>();
  // out and the multiplier are returned to the caller as (B, C, H, W) channels_last tensors
  auto out = empty_channels_last(g.B, g.C, g.H, g.W), mult = empty_channels_last(g.B, g.C, g.H, g.W);
  auto a = empty_map(x.sizes());
  float* op = out.data_ptr<float>();
  float* mp = mult.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  const float k = noise.k(), cl = noise.clip_bound();  // cl: +inf without a clip
  const bool has_clip = noise.clip.has_value();
  const uint64_t useed = static_cast<uint64_t>(noise.seed);
  const bool avx512 = use_avx512();
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    std::vector<float> mu(rw), pix(g.W), normals(drawn ? rw : 0), scratch;
    for (idx r = r0; r < r1_; ++r) {
      const idx b = r / g.H, y = r % g.H;
      const float *rrows[3], *mrows[3];
      neighbours(rp, g, b, y, rw, rrows);
      neighbours(mrp, g, b, y, g.W, mrows);
      stencil_row(pix.data(), mrows, Kall.data(), g.W, 1);
#if WB_HAS_AVX512_PATH
      if (avx512)
        stencil_row_avx512(mu.data(), rrows, Kid.data(), g.W, g.C);
      else
#endif
        stencil_row(mu.data(), rrows, Kid.data(), g.W, g.C);
      const float* e;
      if (drawn) {
        draw_normals(normals.data(), r * rw, rw, useed, scratch, avx512);
        e = normals.data();
      } else {
        e = epsp + r * rw;
      }
      const idx o = r * rw;
#if WB_HAS_AVX512_PATH
      if (avx512) {
        noise_tail_row_avx512(xp + o, mu.data(), pix.data(), e, sp, op + o, mp + o, ap + o, k, cl,
                              -std::numeric_limits<float>::infinity(), g.W, g.C);
        continue;
      }
#endif
      noise_tail_row(xp + o, mu.data(), pix.data(), e, sp, op + o, mp + o, ap + o, k, has_clip, cl, g.W, g.C);
    }
  });
  return {out, mult, a};
}

std::vector<at::Tensor> sweep2_backward(const Sweep2Saved& saved, const at::Tensor& g_out,
                                        const EquivariantKernels& e2, const NoiseOptions& noise, Sweep2Needs need) {
  const at::Tensor &x = saved.x, &r1 = saved.r1, &mr = saved.mr, &a = saved.a, &mult = saved.mult,
                   &scale = saved.scale;
  const at::Tensor &kid = e2.id, &kall = e2.all;
  const bool need_x = need.x, need_r1 = need.r1, need_scale = need.scale, need_k = need.e2;
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  float Kid[9], Kall[9];
  flip9(kernel9(kid).data(), Kid);
  flip9(kernel9(kall).data(), Kall);
  auto s = float_contiguous(scale);
  const float* sp = s.data_ptr<float>();
  auto opts = x.options();
  const float* xp = x.data_ptr<float>();
  const float* rp = r1.data_ptr<float>();
  const float* mrp = mr.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* mp = mult.data_ptr<float>();
  const float* gp = g_out.data_ptr<float>();
  const float k = noise.k(), cl = noise.clip_bound();  // cl: +inf without a clip
  const bool has_clip = noise.clip.has_value();
  const bool need_mu = need_r1 || need_k;
  const bool avx512 = use_avx512();

  auto gx = need_x ? empty_channels_last(g.B, g.C, g.H, g.W) : at::empty({0}, opts);  // see sweep1_backward
  auto gr1 = need_r1 ? empty_map(x.sizes()) : at::empty({0}, opts);
  auto gmr = need_r1 ? at::empty({g.B, g.H, g.W}, opts) : at::empty({0}, opts);
  std::vector<double> spart(need_scale ? static_cast<size_t>(rows_total * g.C) : 0, 0.0);
  std::vector<double> kacc(need_k ? static_cast<size_t>(rows_total * 18) : 0, 0.0);
  float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
  float* grp = need_r1 ? gr1.data_ptr<float>() : nullptr;
  float* gmrp = need_r1 ? gmr.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    // g_mu rows and their channel sums live in a ring of three slots (slot = row index mod 3), each computed once
    // as the sweep moves down; g_x and the scale partials are written only for this chunk's own rows.
    std::vector<float> acc(g.C), dummy(rw), gm(3 * rw), gs(3 * g.W);
    RowRing ring;
    auto produce = [&](idx row, int slot) {
      const bool own = row >= r0 && row < r1_;
      const idx o = row * rw;
      std::fill(acc.begin(), acc.end(), 0.f);
      float* g_x = need_x && own ? gxp + o : dummy.data();
#if WB_HAS_AVX512_PATH
      if (avx512)
        noise_tail_backward_row_avx512(xp + o, mp + o, ap + o, gp + o, sp, g_x, gm.data() + slot * rw,
                                       gs.data() + slot * g.W, acc.data(), k, cl,
                                       -std::numeric_limits<float>::infinity(), g.W, g.C);
      else
#endif
        noise_tail_backward_row(xp + o, mp + o, ap + o, gp + o, sp, g_x, gm.data() + slot * rw,
                                gs.data() + slot * g.W, acc.data(), k, has_clip, cl, g.W, g.C);
      if (need_scale && own)
        for (idx c = 0; c < g.C; ++c) spart[row * g.C + c] = acc[c];
    };
    for (idx r = r0; r < r1_; ++r) {
      if (!need_mu) {
        produce(r, 0);
        continue;
      }
      const idx b = r / g.H, y = r % g.H;
      const float *grows[3], *srows[3];
      ring.window(b, y, g.H, produce, gm.data(), rw, gs.data(), g.W, grows, srows);
      if (need_r1) {
#if WB_HAS_AVX512_PATH
        if (avx512)
          stencil_row_avx512(grp + r * rw, grows, Kid, g.W, g.C);
        else
#endif
          stencil_row(grp + r * rw, grows, Kid, g.W, g.C);
        stencil_row(gmrp + r * g.W, srows, Kall, g.W, 1);
      }
      if (need_k) {
        const float *rrows[3], *mrows[3];
        neighbours(rp, g, b, y, rw, rrows);
        neighbours(mrp, g, b, y, g.W, mrows);
        corr_row(grows[1], rrows, g.W, g.C, kacc.data() + r * 18);
        corr_row(srows[1], mrows, g.W, 1, kacc.data() + r * 18 + 9);
      }
    }
  });
  at::Tensor gscale = at::empty({0}, opts), gkid = at::empty({0}, opts), gkall = at::empty({0}, opts);
  if (need_scale) gscale = sum_row_partials(spart, rows_total, g.C);
  if (need_k) {
    auto t = at::zeros({18}, at::dtype(at::kDouble));
    double* tp = t.data_ptr<double>();
    for (idx r = 0; r < rows_total; ++r)
      for (int i = 0; i < 18; ++i) tp[i] += kacc[r * 18 + i];
    auto tf = t.to(at::kFloat);
    gkid = tf.slice(0, 0, 9).view({1, 1, 3, 3}).clone();
    gkall = tf.slice(0, 9, 18).view({1, 1, 3, 3}).clone();
  }
  return {gx, gr1, gmr, gscale, gkid, gkall};
}

}  // namespace wb
