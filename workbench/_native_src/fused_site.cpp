// The fused site's passes and its scale (declared, with what each computes, in fused_site.h).
#include "fused_site.h"

#if WB_HAS_AVX512_PATH
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "noise.h"
#include "rows_avx512.h"
#include "rows_generic.h"
#include "tensors.h"

namespace wb {
namespace {

// sums[i] += the sum over rows of rows[r n + i], in double, each image's rows_per_image rows in order and then the
// images in order: sums that do not depend on how the rows were split between threads.
void sum_rows_in_order(const std::vector<float>& rows, idx images, idx rows_per_image, idx n, double* sums) {
  std::vector<double> per_image(static_cast<size_t>(images * n), 0.0);
  at::parallel_for(0, images, 1, [&](idx b0, idx b1) {
    for (idx b = b0; b < b1; ++b)
      for (idx r = b * rows_per_image; r < (b + 1) * rows_per_image; ++r)
        for (idx i = 0; i < n; ++i) per_image[b * n + i] += rows[r * n + i];
  });
  for (idx b = 0; b < images; ++b)
    for (idx i = 0; i < n; ++i) sums[i] += per_image[b * n + i];
}

// The sweep both fused backwards share, over the rows [r0, r1_) of one thread: g_mu rows, made by
// produce_mu(row, g_mu row, its channel sums, direct term row), then E2^T and the E1 ReLU mask give g_E1 rows, then
// gx = the direct term + E1^T (g_E1) + the scale path's masked stencils when Ksf is given (gf(b): image b's (4, C)
// gradient over H W), each gx row written once. g_mu (with the direct term) and g_E1 rows live in three-row rings:
// output row y needs g_E1 rows y-1..y+1 and g_E1 row y' needs g_mu rows y'-1..y'+1; made in increasing row order,
// three slots each suffice. row_done(r) runs after gx row r is written (while it is in cache).
template <class ProduceMu, class ScaleGrad, class RowDone>
WB_AVX512 void noise_path_backward(const Geometry& g, idx r0, idx r1_, const uint8_t* maskp,
                                   const uint16_t* relu_bits, float* gxp,
                                   const float* K1f, const float* Ka1f, const float* K2f, const float* Ka2f,
                                   const float* Ksf, ScaleGrad&& gf, ProduceMu&& produce_mu, RowDone&& row_done) {
  const idx rw = g.row(), bits_row = g.W * relu_bit_blocks(g.C);
  std::vector<float> gmu(3 * rw), gmus(3 * g.W), direct(3 * rw), ge(3 * rw), ges(3 * g.W), gr1(rw), gmr(g.W),
      pix(g.W);
  RowRing mu_rows, e_rows;
  PatternRing patterns(Ksf ? rw : 0);
  auto make_mu = [&](idx row, int slot) {
    produce_mu(row, gmu.data() + slot * rw, gmus.data() + slot * g.W, direct.data() + slot * rw);
  };
  auto make_e = [&](idx row, int slot) {
    const idx b = row / g.H, yy = row % g.H;
    const float *mrows[3], *srows[3];
    mu_rows.window(b, yy, g.H, make_mu, gmu.data(), rw, gmus.data(), g.W, mrows, srows);
    stencil_row_avx512(gr1.data(), mrows, K2f, g.W, g.C);
    stencil_row(gmr.data(), srows, Ka2f, g.W, 1);
    relu_backward_row_avx512(relu_bits + row * bits_row, gr1.data(), gmr.data(), ge.data() + slot * rw,
                             ges.data() + slot * g.W, g.W, g.C);
  };
  for (idx r = r0; r < r1_; ++r) {
    const idx b = r / g.H, y = r % g.H;
    // row r's direct term stays in its slot of the g_mu ring until row r + 3 is made, after this row is output
    const int slot = mu_rows.fetch(b, y, g.H, make_mu);
    const float *grows[3], *srows[3];
    const uint32_t* prows[3] = {nullptr, nullptr, nullptr};
    e_rows.window(b, y, g.H, make_e, ge.data(), rw, ges.data(), g.W, grows, srows);
    if (Ksf) patterns.window(maskp, g, b, y, prows);
    stencil_row(pix.data(), srows, Ka1f, g.W, 1);
    sweep1_backward_row_avx512(gxp + r * rw, direct.data() + slot * rw, grows, prows, pix.data(), K1f, Ksf,
                               Ksf ? gf(b) : nullptr, g.W, g.C);
    row_done(r);
  }
}

}  // namespace

// ---- forward

Prepass scale_prepass(const at::Tensor& x, const at::Tensor& kscale, const SiteOptions& site,
                      AffineForm affine) {
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  const bool training = site.training, keep = site.keep;
  const auto Ks = kernel9(kscale);
  auto opts = x.options();
  auto mh = empty_map({g.B, g.H, g.W});
  // the scale bits, for the backward of a training pass (evaluation has no scale path)
  auto mask = keep && training ? empty_map({g.B, g.H, g.W, g.C}, at::kByte) : at::empty({0}, at::kByte);
  const float* xp = x.data_ptr<float>();
  float* mhp = mh.data_ptr<float>();
  uint8_t* mp = keep && training ? mask.data_ptr<uint8_t>() : nullptr;
  if (!training) {
    at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
      AffineRows h(xp, g, affine);
      for (idx r = r0; r < r1_; ++r) {
        const float* hrows[3];
        h.neighbours(r / g.H, r % g.H, hrows);
        prepass_row_avx512<false>(hrows, nullptr, g.W, g.C, mhp + r * g.W, nullptr, nullptr);
      }
    });
    return {mh, at::empty({0}, opts), mask};
  }
  // whole images a thread: each sums its rows' relu sums as it goes (in double, rows in order, as
  // features_from_row_sums does), with no (B H, 4, C) map of row sums and no second pass over one
  auto f = at::empty({g.B, g.C, kScaleKernels}, opts);
  float* fp = f.data_ptr<float>();
  const double inv = 1.0 / static_cast<double>(g.H * g.W);
  at::parallel_for(0, g.B, 1, [&](idx b0, idx b1) {
    std::vector<float> fsum(static_cast<size_t>(kScaleKernels * g.C));
    std::vector<double> acc(fsum.size());
    AffineRows h(xp, g, affine);
    for (idx b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (idx y = 0; y < g.H; ++y) {
        const idx r = b * g.H + y;
        const float* hrows[3];
        h.neighbours(b, y, hrows);
        // h was written by the layer before and is read here first: ask for the rows a few ahead (as the forward does)
        if (r + 6 < rows_total) prefetch_span(xp + (r + 6) * rw, rw * 4);
        prepass_row_avx512<true>(hrows, Ks.data(), g.W, g.C, mhp + r * g.W, mp ? mp + r * rw : nullptr,
                                 fsum.data());
        for (size_t i = 0; i < acc.size(); ++i) acc[i] += fsum[i];
      }
      store_image_features(acc, b, g.C, inv, fp);
    }
  });
  return {mh, f, mask};
}

SiteScale site_scale_forward(const at::Tensor& f, const at::Tensor& running_mean,
                             const at::Tensor& running_var, const at::Tensor& fc_weight,
                             const ScaleOptions& options) {
  const bool training = f.numel() > 0;
  const idx C = running_mean.size(0);
  auto w = kernel9(fc_weight);  // the ten weights, flattened
  auto m = at::empty({C, kScaleKernels}), v = at::empty({C, kScaleKernels});
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  auto rm = running_mean.accessor<float, 2>();
  auto rv = running_var.accessor<float, 2>();
  if (training) {
    auto fc = f.contiguous();
    const float* fp = fc.data_ptr<float>();
    const idx B = fc.size(0), n = C * kScaleKernels;
    // two passes over f in memory order (b outer): the (c, j) columns are strided by C * 4 floats
    std::vector<double> sum(n, 0.0), squares(n, 0.0), mean(n);
    for (idx b = 0; b < B; ++b)
      for (idx i = 0; i < n; ++i) sum[i] += fp[b * n + i];
    for (idx i = 0; i < n; ++i) mean[i] = sum[i] / static_cast<double>(B);
    for (idx b = 0; b < B; ++b)
      for (idx i = 0; i < n; ++i) {
        const double d = fp[b * n + i] - mean[i];
        squares[i] += d * d;
      }
    const double momentum = options.momentum;
    const double correction = options.double_bessel ? static_cast<double>(B) / static_cast<double>(B - 1) : 1.0;
    for (idx c = 0; c < C; ++c)
      for (int j = 0; j < kScaleKernels; ++j) {
        const idx i = c * kScaleKernels + j;
        const double var = squares[i] / static_cast<double>(B - 1);
        mp[i] = static_cast<float>(mean[i]);
        vp[i] = static_cast<float>(var);
        rm[c][j] = static_cast<float>((1.0 - momentum) * rm[c][j] + momentum * static_cast<float>(mean[i]));
        rv[c][j] = static_cast<float>((1.0 - momentum) * rv[c][j] + momentum * static_cast<float>(var) * correction);
      }
  } else {
    for (idx c = 0; c < C; ++c)
      for (int j = 0; j < kScaleKernels; ++j) {
        mp[c * kScaleKernels + j] = rm[c][j];
        vp[c * kScaleKernels + j] = rv[c][j];
      }
  }
  auto s = at::empty({C});
  float* sp = s.data_ptr<float>();
  for (idx c = 0; c < C; ++c) {
    double pre = w[8] * options.channel_ratio + w[9] * options.size_ratio;
    for (int j = 0; j < kScaleKernels; ++j)
      pre += static_cast<double>(w[j]) * mp[c * kScaleKernels + j] +
             static_cast<double>(w[kScaleKernels + j]) * vp[c * kScaleKernels + j];
    sp[c] = static_cast<float>(1.0 / (1.0 + std::exp(-pre)));
  }
  return {s, m};
}

FusedForward fused_forward(const at::Tensor& x, const at::Tensor& mh, const at::Tensor& scale,
                           const PhiKernels& phi, const NoiseOptions& noise, const SiteOptions& site,
                           AffineForm affine) {
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  const bool keep = site.keep, relu = site.relu, pool = site.pool;
  const idx Hp = g.H / 2, Wp = g.W / 2;
  TORCH_CHECK(!pool || (Hp > 0 && Wp > 0), "a fused 2x2 pool needs a map of at least 2x2, got ", g.H, "x", g.W);
  const auto K1 = kernel9(phi.e1.id), Ka1 = kernel9(phi.e1.all), K2 = kernel9(phi.e2.id), Ka2 = kernel9(phi.e2.all);
  auto s = float_contiguous(scale);
  const float* sp = s.data_ptr<float>();
  const bool drawn = noise.drawn();
  const float* epsp = drawn ? nullptr : noise.eps.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* mhp = mh.data_ptr<float>();
  // the E1 ReLU bits for the backward: a 16-bit word a pixel and 16-channel block
  const idx blocks = relu_bit_blocks(g.C), bits_row = g.W * blocks;
  auto relu_bits = keep ? empty_map({g.B, g.H, g.W, blocks}, at::kShort) : at::empty({0}, at::kShort);
  uint16_t* bitsp = keep ? reinterpret_cast<uint16_t*>(relu_bits.data_ptr<int16_t>()) : nullptr;
  auto out = pool ? empty_channels_last(g.B, g.C, Hp, Wp) : empty_channels_last(g.B, g.C, g.H, g.W);
  const bool keep_a = keep && !pool, keep_pooled = keep && pool;
  auto a = keep_a ? empty_map(x.sizes()) : at::empty({0}, x.options());
  auto pooled_map = [&](at::ScalarType type) {
    return keep_pooled ? empty_map({g.B, Hp, Wp, g.C}, type) : at::empty({0}, at::TensorOptions(type));
  };
  auto winners = pooled_map(at::kByte), win_m = pooled_map(at::kFloat), win_d = pooled_map(at::kFloat),
       win_p = pooled_map(at::kFloat);
  float* op = out.data_ptr<float>();
  float* ap = keep_a ? a.data_ptr<float>() : nullptr;
  std::vector<double> rowstats(static_cast<size_t>(2 * rows_total), 0.0);
  const float k = noise.k();
  const float inf = std::numeric_limits<float>::infinity();
  const float cl = noise.clip_bound();
  const float lo = relu ? 0.0f : -inf;
  const uint64_t useed = static_cast<uint64_t>(noise.seed);
  // with pool the rows are split between threads at row pairs, so that one thread makes both rows of a window
  const idx pairs = (g.H + 1) / 2, units = pool ? g.B * pairs : rows_total;
  auto first_row = [&](idx unit) { return pool ? unit / pairs * g.H + 2 * (unit % pairs) : unit; };
  at::parallel_for(0, units, 1, [&](idx u0, idx u1) {
    const idx r0 = first_row(u0), r1_ = first_row(u1);
    std::vector<float> ring(3 * rw), ring_mr(3 * g.W), mu(rw), pix(g.W), normals(drawn ? rw : 0), scratch,
        a_rows(keep_a ? 0 : 2 * rw), v_rows(pool ? 2 * rw : 0);
    RowRing r1_rows;
    AffineRows h(xp, g, affine);
    // r1 = relu(E1(h)) of a row into its ring slot, with the row's channel mean
    auto produce = [&](idx row, int slot) {
      const idx b = row / g.H, yy = row % g.H;
      const float *hrows[3], *mhrows[3];
      h.neighbours(b, yy, hrows);
      if (row + 3 < rows_total) prefetch_span(xp + (row + 3) * rw, rw * 4);
      neighbours(mhp, g, b, yy, g.W, mhrows);
      stencil_row(pix.data(), mhrows, Ka1.data(), g.W, 1);
      const bool own = row >= r0 && row < r1_;  // each row's ReLU bits are written once, by its own chunk
      e1_row_avx512(hrows, pix.data(), K1.data(), g.W, g.C, ring.data() + slot * rw,
                    own && keep ? bitsp + row * bits_row : nullptr, ring_mr.data() + slot * g.W);
    };
    for (idx r = r0; r < r1_; ++r) {
      const idx b = r / g.H, y = r % g.H;
      const float *rrows[3], *mrrows[3];
      r1_rows.window(b, y, g.H, produce, ring.data(), rw, ring_mr.data(), g.W, rrows, mrrows);
      stencil_row_avx512(mu.data(), rrows, K2.data(), g.W, g.C);
      stencil_row(pix.data(), mrrows, Ka2.data(), g.W, 1);
      const float* e = epsp + r * rw;
      if (drawn) {
        draw_normals(normals.data(), r * rw, rw, useed, scratch, true);
        e = normals.data();
      }
      const idx o = r * rw;
      // with pool the row's h m and a go to two-row buffers, bounded and pooled when the window's second row is done
      noise_tail_row_avx512(h.row(r), mu.data(), pix.data(), e, sp, pool ? v_rows.data() + (y & 1) * rw : op + o,
                            nullptr, keep_a ? ap + o : a_rows.data() + (y & 1) * rw, k, pool ? inf : cl,
                            pool ? -inf : lo, g.W, g.C, rowstats.data() + 2 * r);
      if (pool && (y & 1)) {
        const idx pooled = (b * Hp + y / 2) * Wp * g.C;
        PooledKeep kept;
        if (keep_pooled)
          kept = {winners.data_ptr<uint8_t>() + pooled, win_m.data_ptr<float>() + pooled,
                  win_d.data_ptr<float>() + pooled, win_p.data_ptr<float>() + pooled};
        const float* vr[2] = {v_rows.data(), v_rows.data() + rw};
        const float* ar[2] = {a_rows.data(), a_rows.data() + rw};
        const float* hr[2] = {h.row(r - 1), h.row(r)};
        pool_rows_avx512(vr, ar, hr, sp, k, Wp, g.C, cl, lo, op + pooled, kept);
      }
    }
  });
  double sum = 0.0, squares = 0.0;
  for (idx r = 0; r < rows_total; ++r) {
    sum += rowstats[2 * r];
    squares += rowstats[2 * r + 1];
  }
  const double n = static_cast<double>(x.numel()), mean = sum / n;
  const double var = n > 1 ? std::max(0.0, (squares - n * mean * mean) / (n - 1)) : 0.0;
  auto stats = at::tensor({static_cast<float>(mean), static_cast<float>(std::sqrt(var))});
  return {out, a, stats, relu_bits, {winners, win_m, win_d, win_p}};
}

// ---- backward

at::Tensor site_scale_backward(const at::Tensor& f, const at::Tensor& m, const at::Tensor& s,
                               const at::Tensor& fc_weight, const at::Tensor& g_s) {
  auto fc = f.contiguous();
  const idx B = fc.size(0), C = fc.size(1);
  auto w = kernel9(fc_weight);
  auto gsc = float_contiguous(g_s);
  const float* fp = fc.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* gp = gsc.data_ptr<float>();
  auto g_f = at::empty({B, C, kScaleKernels});
  float* out = g_f.data_ptr<float>();
  const float inv_b = 1.0f / static_cast<float>(B), two_over = 2.0f / static_cast<float>(B - 1);
  const idx n = C * kScaleKernels;
  std::vector<float> g_mean(n), g_var(n);
  for (idx c = 0; c < C; ++c) {
    const float g_pre = gp[c] * sp[c] * (1.0f - sp[c]);
    for (int j = 0; j < kScaleKernels; ++j) {
      g_mean[c * kScaleKernels + j] = g_pre * w[j] * inv_b;
      g_var[c * kScaleKernels + j] = g_pre * w[kScaleKernels + j] * two_over;
    }
  }
  for (idx b = 0; b < B; ++b)  // in memory order
    for (idx i = 0; i < n; ++i) out[b * n + i] = g_mean[i] + g_var[i] * (fp[b * n + i] - mp[i]);
  return g_f;
}

std::vector<at::Tensor> fused_backward(const at::Tensor& x, const at::Tensor& a,
                                       const at::Tensor& relu_bits, const at::Tensor& scale,
                                       const at::Tensor& g_out, const PhiKernels& phi,
                                       const NoiseOptions& noise, const SiteOptions& site, AffineForm affine) {
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  float K1f[9], Ka1f[9], K2f[9], Ka2f[9];
  flip9(kernel9(phi.e1.id).data(), K1f);
  flip9(kernel9(phi.e1.all).data(), Ka1f);
  flip9(kernel9(phi.e2.id).data(), K2f);
  flip9(kernel9(phi.e2.all).data(), Ka2f);
  auto s = float_contiguous(scale);
  const float* sp = s.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* gp = g_out.data_ptr<float>();
  const uint16_t* bitsp = reinterpret_cast<const uint16_t*>(relu_bits.data_ptr<int16_t>());
  auto gx = empty_channels_last(g.B, g.C, g.H, g.W);  // a tensor of its own: see sweep1_backward
  float* gxp = gx.data_ptr<float>();
  const bool need_scale = site.training;
  std::vector<double> spart(need_scale ? static_cast<size_t>(rows_total * g.C) : 0, 0.0);
  const float k = noise.k();
  const float cl = noise.clip_bound();
  const float lo = site.relu ? 0.0f : -std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    std::vector<float> acc(g.C);
    AffineRows h(xp, g, affine);  // h = x, or the rows of a fused BatchNorm's output
    auto no_scale = [](idx) -> const float* { return nullptr; };
    noise_path_backward(g, r0, r1_, nullptr, bitsp, gxp, K1f, Ka1f, K2f, Ka2f, nullptr, no_scale,
                        [&](idx row, float* gmu, float* gmu_sum, float* direct) {
      const bool own = row >= r0 && row < r1_;
      const idx o = row * rw;
      std::fill(acc.begin(), acc.end(), 0.f);
      noise_tail_backward_row_avx512(h.row(row), nullptr, ap + o, gp + o, sp, direct, gmu, gmu_sum, acc.data(), k,
                                     cl, lo, g.W, g.C);
      if (need_scale && own)
        for (idx c = 0; c < g.C; ++c) spart[row * g.C + c] = acc[c];
    }, [](idx) {});
  });
  at::Tensor gscale = at::empty({0}, x.options());
  if (need_scale) gscale = sum_row_partials(spart, rows_total, g.C);
  return {gx, gscale};
}

at::Tensor pooled_scale_grad(const at::Tensor& g_pool, const at::Tensor& win_p) {
  const idx C = g_pool.size(3), rows = g_pool.size(0) * g_pool.size(1), rw = g_pool.size(2) * C;
  const float* gp = g_pool.data_ptr<float>();
  const float* pp = win_p.data_ptr<float>();
  std::vector<float> row_sums(static_cast<size_t>(rows * C), 0.f);
  at::parallel_for(0, rows, 1, [&](idx r0, idx r1_) {
    for (idx r = r0; r < r1_; ++r) {
      float* __restrict acc = row_sums.data() + r * C;
      for (idx o = r * rw; o < (r + 1) * rw; o += C)
#pragma omp simd
        for (idx c = 0; c < C; ++c) acc[c] += gp[o + c] * pp[o + c];
    }
  });
  std::vector<double> total(C, 0.0);
  sum_rows_in_order(row_sums, g_pool.size(0), g_pool.size(1), C, total.data());
  auto out = at::empty({C});
  for (idx c = 0; c < C; ++c) out.data_ptr<float>()[c] = static_cast<float>(total[c]);
  return out;
}

at::Tensor fused_backward_pooled(const at::Tensor& mask, const at::Tensor& relu_bits,
                                 const at::Tensor& g_pool, const PooledWinners& winners,
                                 const at::Tensor& g_f, const PhiKernels& phi, BatchNormSums bn) {
  const Geometry g{relu_bits.size(0), relu_bits.size(1), relu_bits.size(2), g_pool.size(3)};
  const idx rows_total = g.B * g.H, rw = g.row(), Hp = g.H / 2, Wp = g.W / 2;
  float K1f[9], Ka1f[9], K2f[9], Ka2f[9];
  flip9(kernel9(phi.e1.id).data(), K1f);
  flip9(kernel9(phi.e1.all).data(), Ka1f);
  flip9(kernel9(phi.e2.id).data(), K2f);
  flip9(kernel9(phi.e2.all).data(), Ka2f);
  std::vector<float> Ksf(9 * kScaleKernels);
  const auto ks = kernel9(phi.scale);
  for (int j = 0; j < kScaleKernels; ++j) flip9(ks.data() + 9 * j, Ksf.data() + 9 * j);
  const bool scale_path = g_f.numel() > 0;
  const auto gf = scale_path ? scale_grad_rows(g_f, g.H * g.W) : std::vector<float>();
  const float* gfp = scale_path ? gf.data() : nullptr;
  const float* gp = g_pool.data_ptr<float>();
  const uint8_t* wp = winners.code.data_ptr<uint8_t>();
  const float* mwp = winners.m.data_ptr<float>();
  const float* dwp = winners.d.data_ptr<float>();
  const uint8_t* maskp = scale_path ? mask.data_ptr<uint8_t>() : nullptr;  // the scale bits (training only)
  const uint16_t* bitsp = reinterpret_cast<const uint16_t*>(relu_bits.data_ptr<int16_t>());
  auto gx = empty_channels_last(g.B, g.C, g.H, g.W);
  float* gxp = gx.data_ptr<float>();
  std::vector<float> row_sums(bn ? static_cast<size_t>(rows_total * 2 * g.C) : 0);  // row r: 2C at r 2C
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    auto scale_grad = [&](idx b) { return gfp + b * kScaleKernels * g.C; };
    noise_path_backward(g, r0, r1_, maskp, bitsp, gxp, K1f, Ka1f, K2f, Ka2f, scale_path ? Ksf.data() : nullptr,
                        scale_grad,
                        [&](idx row, float* gmu, float* gmu_sum, float* direct) {
      const idx y = row % g.H, pooled = (row / g.H * Hp + y / 2) * Wp * g.C;
      if (row + 3 < rows_total) {
        prefetch_span(gxp + (row + 3) * rw, rw * 4, true);
        if (maskp) prefetch_span(maskp + (row + 3) * rw, rw);
      }
      unpool_row_avx512(gp + pooled, wp + pooled, mwp + pooled, dwp + pooled, y, Hp, Wp, g.W, g.C, direct, gmu,
                        gmu_sum);
    }, [&](idx r) {
      if (!bn) return;
      if (r + 3 < r1_) prefetch_span(bn.input + (r + 3) * rw, rw * 4);
      float* sums = row_sums.data() + r * 2 * g.C;
      batch_norm_row_sums_avx512<true>(gxp + r * rw, bn.input + r * rw, bn.mean, g.W, g.C, sums, sums + g.C);
    });
  });
  if (bn) sum_rows_in_order(row_sums, g.B, g.H, 2 * g.C, bn.sums);
  return gx;
}

at::Tensor scale_backward(const at::Tensor& mask, const at::Tensor& g_f, const at::Tensor& kscale,
                          at::Tensor gx, BatchNormSums bn) {
  const idx B = mask.size(0), H = mask.size(1), W = mask.size(2), C = mask.size(3);
  const idx rows_total = B * H, rw = W * C;
  std::vector<float> Ksf(9 * kScaleKernels);
  const auto k = kernel9(kscale);
  for (int j = 0; j < kScaleKernels; ++j) flip9(k.data() + 9 * j, Ksf.data() + 9 * j);
  const auto gf = scale_grad_rows(g_f, H * W);
  const float* gfp = gf.data();
  const uint8_t* maskp = mask.data_ptr<uint8_t>();
  float* gxp = gx.data_ptr<float>();  // channels_last memory: NHWC
  const Geometry g{B, H, W, C};
  std::vector<float> row_sums(bn ? static_cast<size_t>(rows_total * 2 * C) : 0);
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    PatternRing patterns(rw);
    for (idx r = r0; r < r1_; ++r) {
      const idx b = r / H, y = r % H;
      const uint32_t* prows[3];
      patterns.window(maskp, g, b, y, prows);
      sweep1_backward_row_avx512(gxp + r * rw, gxp + r * rw, nullptr, prows, nullptr, nullptr, Ksf.data(),
                                 gfp + b * kScaleKernels * C, W, C);
      if (bn) {
        if (r + 3 < r1_) prefetch_span(bn.input + (r + 3) * rw, rw * 4);
        float* sums = row_sums.data() + r * 2 * C;
        batch_norm_row_sums_avx512<true>(gxp + r * rw, bn.input + r * rw, bn.mean, W, C, sums, sums + C);
      }
    }
  });
  if (bn) sum_rows_in_order(row_sums, g.B, g.H, 2 * g.C, bn.sums);
  return gx;
}

}  // namespace wb
#endif  // WB_HAS_AVX512_PATH
