// The AVX-512 rows: hand-vectorised forms of the stencil-heavy rows, used when the CPU has AVX-512 (F, BW, VL, DQ)
// and selected at run time (`set_isa`), so one build serves every x86 CPU. Each 16-channel block is one register: the
// five stencils of sweep 1 share their nine tap loads (the generic rows reload every tap per kernel), channel tails
// and image edges are masked loads (a masked-off lane reads nothing and gives 0), and the scale path's backward reads
// the mask bytes directly instead of four expanded gradient maps. Same maths as the generic rows; sums are ordered
// differently, so results agree to rounding. The fused site's rows (pre-pass, E1, pool, unpool, BatchNorm sums) exist
// in this form only.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "rings.h"

#if WB_HAS_AVX512_PATH
namespace wb {

// One output row of sweep 1: r1 = relu(E1(h)) (E1 = K_id stencil + pix[x], pix = the K_all stencil of the channel
// mean), the mask bytes, mr[x] = mean_c r1 and, when training, fsum[j, c] = sum_x relu(K_j * h).
template <bool kTraining>
WB_AVX512 void sweep1_row_avx512(const float* const hrows[3], const float* __restrict pix, const float* K1,
                                 const float* Ks, idx W, idx C, float* __restrict r1, uint8_t* __restrict mask,
                                 float* __restrict mr, float* __restrict fsum);

// The scale path's mask bits of one row as horizontal patterns, for table lookups in the backward: word (x, c) holds
// bit j of the mask bytes at x - 1, x and x + 1 (zero off the image) in its bits 3 j, 3 j + 1 and 3 j + 2. A
// permute reads the low four bits of each index, so (word >> 3 j) picks a row's share of kernel j's transposed
// stencil from a 16-entry table (entries 8-15 repeat 0-7 for the next kernel's bit above): one permute instead of
// three bit tests and three masked adds.
WB_AVX512 void scale_pattern_row_avx512(const uint8_t* __restrict mask, idx W, idx C, uint32_t* __restrict out);

// Scale-pattern rows of a mask in a ring of three slots: each row is made once per sweep and read by three
// output rows.
class PatternRing {
 public:
  explicit PatternRing(idx row_words) : words_(static_cast<size_t>(3 * row_words)), rw_(row_words) {}

  // rows y - 1, y, y + 1 of image b (nullptr outside the image) of the NHWC mask bytes at maskp
  WB_AVX512 void window(const uint8_t* maskp, const Geometry& g, idx b, idx y, const uint32_t* rows[3]) {
    auto make = [&](idx row, int slot) {
      scale_pattern_row_avx512(maskp + row * rw_, g.W, g.C, words_.data() + slot * rw_);
    };
    for (int dy = 0; dy < 3; ++dy) {
      const int slot = ring_.fetch(b, y + dy - 1, g.H, make);
      rows[dy] = slot >= 0 ? words_.data() + slot * rw_ : nullptr;
    }
  }

 private:
  std::vector<uint32_t> words_;
  idx rw_;
  RowRing ring_;
};

// One row of sweep 1's input gradient (kernels flipped for the transposed stencils):
// out = addend + K_id^T * gE + pix[x] / C + sum_j gf[j, c] * (K_j^T * [mask bit j]) (addend: a row to add, which
// may be out itself, or nullptr for none).
// prows: the scale-pattern rows (scale_pattern_row_avx512) above, at and below (nullptr outside the image); grows:
// the g_E1 rows likewise, or nullptr for no E1 term (then pix is unused); gf: this image's (4, C) scale-feature
// gradient over H W, or nullptr when the scale path carries none. The g_E1 values slide along the row in registers
// (Window3): three loads per output instead of nine.
WB_AVX512 void sweep1_backward_row_avx512(float* out, const float* addend, const float* const* grows,
                                          const uint32_t* const prows[3], const float* __restrict pix,
                                          const float* K1f, const float* Ksf, const float* gf, idx W, idx C);

// out = sum_{dy, dx} K[3 dy + dx] * rows[dy][x + dx - 1, c] (a null row is zero padding): one stencil row
WB_AVX512 void stencil_row_avx512(float* __restrict out, const float* const rows[3], const float* K, idx W, idx C);

// noise_tail_row over one image row: a = mu + pix[x] + eps, m = 1 + k (s softplus(a) - 1),
// out = max(min(h m, clip), lo) (lo = -inf, or 0 where the layer's ReLU is fused into the site).
// mult: the multiplier row, or nullptr not to write it; mstats: (sum m, sum m^2) += this row's, or nullptr.
WB_AVX512 void noise_tail_row_avx512(const float* __restrict h, const float* __restrict mu,
                                     const float* __restrict pix, const float* __restrict eps,
                                     const float* __restrict scale, float* __restrict out, float* __restrict mult,
                                     float* __restrict a_out, float k, float cl, float lo, idx W, idx C,
                                     double* mstats = nullptr);

// noise_tail_backward_row over one image row (see there); acc[c] += sum_x g_m z. mult: the forward's multiplier
// row, or nullptr to recompute it from a (the same expression as the forward, so the same values). lo: the
// forward's lower bound (-inf, or 0 for a fused ReLU, which passes the gradient where h m > 0).
WB_AVX512 void noise_tail_backward_row_avx512(const float* __restrict h, const float* __restrict mult,
                                              const float* __restrict a, const float* __restrict g_out,
                                              const float* __restrict scale, float* __restrict g_x,
                                              float* __restrict g_mu, float* __restrict g_mu_sum,
                                              float* __restrict acc, float k, float cl, float lo, idx W, idx C);

// Pre-pass row: mh[x] = mean_c h (the centre row); when training also fsum[j, c] = sum_x relu(K_j * h) and the mask
// bytes' bits 0-3 (K_j * h > 0).
template <bool kTraining>
WB_AVX512 void prepass_row_avx512(const float* const hrows[3], const float* Ks, idx W, idx C,
                                  float* __restrict mh, uint8_t* __restrict mask, float* __restrict fsum);

// r1 = relu(E1(h)) for one row (E1 = K_id stencil + pix[x]) and mr[x] = mean_c r1; relu_bits: nullptr, or the row's
// ReLU bits (E1 > 0), one 16-bit word a pixel and 16-channel block (the compare's own mask, stored as it is).
WB_AVX512 void e1_row_avx512(const float* const hrows[3], const float* __restrict pix, const float* K1, idx W, idx C,
                             float* __restrict r1, uint16_t* __restrict relu_bits, float* __restrict mr);

// BatchNorm's per-channel sums over one NHWC row, 64 channels at a time in registers, pixels in order (the row is
// read once, front to back): the batch moments' s1 = sum (a - k), s2 = sum (a - k)^2 (kGradient false, b unused), or
// the backward's s1 = sum a, s2 = sum a (b - k) (a: the gradient row, b: the input row, k: the batch mean).
template <bool kGradient>
WB_AVX512 void batch_norm_row_sums_avx512(const float* __restrict a, const float* __restrict b,
                                          const float* __restrict k, idx W, idx C, float* __restrict s1,
                                          float* __restrict s2);

// g_E1 for one row: ge = [E1 > 0] (g_r1 + g_mr[x] / C) and its channel sums gsum[x] (relu_bits: the row's words
// from e1_row_avx512)
WB_AVX512 void relu_backward_row_avx512(const uint16_t* __restrict relu_bits, const float* __restrict g_r1,
                                        const float* __restrict g_mr, float* __restrict ge, float* __restrict gsum,
                                        idx W, idx C);

// ---- the layer's 2x2 max-pool (stride 2, floor) fused into the site

constexpr uint8_t kNoWinner = 4;  // a window whose winner passes no gradient (clipped, or zeroed by the ReLU)

// What a pooled site keeps for its backward, per pooled element (pointers at the pooled row; all nullptr when no
// backward follows): the window's winner (code: its place, kNoWinner where it passes no gradient, so that the
// unpooled gradient goes nowhere), and for that winner the multiplier m, d = h k s sigmoid(a) (so g_mu = g d there)
// and p = h k z, zero where the winner passes no gradient (g_s sums g p over the pooled map without the codes).
struct PooledKeep {
  uint8_t* code = nullptr;
  float* m = nullptr;
  float* d = nullptr;
  float* p = nullptr;
};

// One pooled row from two rows of v = h m (before the clip and the bound): out = the window's largest
// max(min(v, clip), lo), the first of equal values in row-major order winning (as torch's max_pool2d); with keep, the
// winner's place 0..3 in that order when the gradient passes it (lo < v <= clip), else kNoWinner, and what the
// backward reads at the winner (PooledKeep), from the two rows' a = mu + eps and h. The backward then runs no
// transcendental function and reads neither h nor a: only a quarter of the elements get a gradient through the pool.
WB_AVX512 void pool_rows_avx512(const float* const v[2], const float* const a[2], const float* const h[2],
                                const float* __restrict scale, float k, idx Wp, idx C, float cl, float lo,
                                float* __restrict out, const PooledKeep& keep);

// Row y of a pooled site's backward from the pooled gradient (g_pool, code, m, d: that row's pooled row yp = y / 2,
// unread when y is the unpooled last row of an odd height): g_x = g m and g_mu = g d at each window's winner, zero
// elsewhere (and in the unpooled last column of an odd width); g_mu_sum[x] = sum_c g_mu.
WB_AVX512 void unpool_row_avx512(const float* __restrict g_pool, const uint8_t* __restrict code,
                                 const float* __restrict mw, const float* __restrict dw, idx y, idx Hp, idx Wp, idx W,
                                 idx C, float* __restrict g_x, float* __restrict g_mu, float* __restrict g_mu_sum);

}  // namespace wb
#endif  // WB_HAS_AVX512_PATH
