// The AVX-512 rows (declared, with what each computes, in rows_avx512.h) and the row-kernel switch.
#include "rows_avx512.h"

#include "avx512_math.h"

namespace wb {

#if WB_HAS_AVX512_PATH
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

namespace {

// out[x] = scale * sum_c row[x, c], the channels in blocks of sixteen in order and then across the register (the order
// of the per-block column sums it replaced: the same numbers). A pass over a row the sweep just wrote, so it reads
// from L1, where accumulating column sums beside the sweep stored one more register per element.
WB_AVX512 void channel_sums_avx512(const float* __restrict row, idx W, idx C, float scale, float* __restrict out) {
  for (idx x = 0; x < W; ++x) {
    __m512 acc = _mm512_setzero_ps();
    for (idx cb = 0; cb < C; cb += 16) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(lanes_of(C - cb), row + x * C + cb));
    out[x] = _mm512_reduce_add_ps(acc) * scale;
  }
}

// The three columns x - 1, x, x + 1 a 3x3 stencil reads at pixel x, and their lane masks: an off-image column gets
// mask 0 (its masked load reads nothing and gives zeros) and a valid address.
struct TapColumns {
  idx x[3];
  __mmask16 mask[3];
};
WB_AVX512 inline TapColumns tap_columns(idx x, idx W, __mmask16 lm) {
  const bool left = x > 0, right = x + 1 < W;
  return {{left ? x - 1 : x, x, right ? x + 1 : x},
          {left ? lm : static_cast<__mmask16>(0), lm, right ? lm : static_cast<__mmask16>(0)}};
}

// The 3x3 neighbourhood of one 16-channel block at pixel x of a row, in registers: columns x - 1, x, x + 1 of the
// rows above, at and below (zeros off the image). Sliding to x + 1 loads only the new column: three loads per output
// instead of nine, which on cores that load one 512-bit register per cycle leaves the FMAs to set the pace.
struct Window3 {
  __m512 v[3][3];  // [row][column]

  WB_AVX512 void start(const float* const rows[3], idx W, idx C, idx cb, __mmask16 lm) {
    for (int dy = 0; dy < 3; ++dy) {
      v[dy][0] = _mm512_setzero_ps();
      v[dy][1] = rows[dy] ? _mm512_maskz_loadu_ps(lm, rows[dy] + cb) : _mm512_setzero_ps();
      v[dy][2] = rows[dy] && W > 1 ? _mm512_maskz_loadu_ps(lm, rows[dy] + C + cb) : _mm512_setzero_ps();
    }
  }
  // from centre x - 1 to centre x
  WB_AVX512 void slide(const float* const rows[3], idx x, idx W, idx C, idx cb, __mmask16 lm) {
    for (int dy = 0; dy < 3; ++dy) {
      v[dy][0] = v[dy][1];
      v[dy][1] = v[dy][2];
      v[dy][2] = rows[dy] && x + 1 < W ? _mm512_maskz_loadu_ps(lm, rows[dy] + (x + 1) * C + cb) : _mm512_setzero_ps();
    }
  }
  // sum_{dy, dx} K[3 dy + dx] v[dy][dx], in three independent chains
  WB_AVX512 __m512 apply(const float* K) const {
    __m512 a[3];
    for (int dy = 0; dy < 3; ++dy) {
      a[dy] = _mm512_mul_ps(v[dy][0], _mm512_set1_ps(K[3 * dy]));
      a[dy] = _mm512_fmadd_ps(v[dy][1], _mm512_set1_ps(K[3 * dy + 1]), a[dy]);
      a[dy] = _mm512_fmadd_ps(v[dy][2], _mm512_set1_ps(K[3 * dy + 2]), a[dy]);
    }
    return _mm512_add_ps(_mm512_add_ps(a[0], a[1]), a[2]);
  }
};

// The four scale stencils K_j * h at pixels x .. x + kPixels - 1 of one 16-channel block. Pixels side by side share
// each broadcast kernel tap between their FMAs and the columns they read: four pixels (sixteen accumulators) load
// six columns per row instead of twelve, and each tap once instead of four times.
template <int kPixels>
WB_AVX512 inline void scale_stencils(const float* const hrows[3], const float* Ks, idx x, idx W, idx C, idx cb,
                                     __mmask16 lm, __m512 s[kPixels][kScaleKernels]) {
  idx col[kPixels + 2];
  __mmask16 cmask[kPixels + 2];
  for (int i = 0; i < kPixels + 2; ++i) {
    const idx xx = x - 1 + i;
    const bool inside = xx >= 0 && xx < W;
    col[i] = inside ? xx : x;
    cmask[i] = inside ? lm : static_cast<__mmask16>(0);
  }
  for (int p = 0; p < kPixels; ++p)
    for (int j = 0; j < kScaleKernels; ++j) s[p][j] = _mm512_setzero_ps();
  for (int dy = 0; dy < 3; ++dy) {
    if (hrows[dy] == nullptr) continue;
    __m512 t[kPixels + 2];
    for (int i = 0; i < kPixels + 2; ++i) t[i] = _mm512_maskz_loadu_ps(cmask[i], hrows[dy] + col[i] * C + cb);
    for (int dx = 0; dx < 3; ++dx)
      for (int j = 0; j < kScaleKernels; ++j) {
        const __m512 k = _mm512_set1_ps(Ks[9 * j + 3 * dy + dx]);
        for (int p = 0; p < kPixels; ++p) s[p][j] = _mm512_fmadd_ps(t[p + dx], k, s[p][j]);
      }
  }
}

}  // namespace

template <bool kTraining>
WB_AVX512 void sweep1_row_avx512(const float* const hrows[3], const float* __restrict pix, const float* K1,
                                 const float* Ks, idx W, idx C, float* __restrict r1, uint8_t* __restrict mask,
                                 float* __restrict mr, float* __restrict fsum) {
  const __m512 zero = _mm512_setzero_ps();
  for (idx cb = 0; cb < C; cb += 16) {
    const __mmask16 lm = lanes_of(C - cb);
    __m512 f[kScaleKernels];
    for (int j = 0; j < kScaleKernels; ++j) f[j] = zero;
    for (idx x = 0; x < W; ++x) {
      const TapColumns cols = tap_columns(x, W, lm);
      __m512 e[3] = {zero, zero, zero};
      __m512 s[kScaleKernels];
      for (int j = 0; j < kScaleKernels; ++j) s[j] = zero;
      for (int dy = 0; dy < 3; ++dy) {
        if (hrows[dy] == nullptr) continue;
        const float* p = hrows[dy] + cb;
        const __m512 t0 = _mm512_maskz_loadu_ps(cols.mask[0], p + cols.x[0] * C);
        const __m512 t1 = _mm512_maskz_loadu_ps(cols.mask[1], p + cols.x[1] * C);
        const __m512 t2 = _mm512_maskz_loadu_ps(cols.mask[2], p + cols.x[2] * C);
        const float* k = K1 + 3 * dy;
        e[dy] = _mm512_fmadd_ps(t0, _mm512_set1_ps(k[0]), e[dy]);
        e[dy] = _mm512_fmadd_ps(t1, _mm512_set1_ps(k[1]), e[dy]);
        e[dy] = _mm512_fmadd_ps(t2, _mm512_set1_ps(k[2]), e[dy]);
        if constexpr (kTraining) {
          for (int j = 0; j < kScaleKernels; ++j) {
            const float* kj = Ks + 9 * j + 3 * dy;
            s[j] = _mm512_fmadd_ps(t0, _mm512_set1_ps(kj[0]), s[j]);
            s[j] = _mm512_fmadd_ps(t1, _mm512_set1_ps(kj[1]), s[j]);
            s[j] = _mm512_fmadd_ps(t2, _mm512_set1_ps(kj[2]), s[j]);
          }
        }
      }
      const __m512 ev = _mm512_add_ps(_mm512_add_ps(e[0], e[1]), _mm512_add_ps(e[2], _mm512_set1_ps(pix[x])));
      const __mmask16 pos = _mm512_mask_cmp_ps_mask(lm, ev, zero, _CMP_GT_OQ);
      const __m512 rv = _mm512_maskz_mov_ps(pos, ev);
      store_block(r1 + x * C + cb, lm, rv);
      __m128i bits = _mm_maskz_mov_epi8(pos, _mm_set1_epi8(static_cast<char>(kReluBit)));
      if constexpr (kTraining) {
        for (int j = 0; j < kScaleKernels; ++j) {
          const __mmask16 sp = _mm512_mask_cmp_ps_mask(lm, s[j], zero, _CMP_GT_OQ);
          f[j] = _mm512_mask_add_ps(f[j], sp, f[j], s[j]);
          bits = _mm_or_si128(bits, _mm_maskz_mov_epi8(sp, _mm_set1_epi8(static_cast<char>(1 << j))));
        }
      }
      store_block(mask + x * C + cb, lm, bits);
    }
    if constexpr (kTraining)
      for (int j = 0; j < kScaleKernels; ++j) _mm512_mask_storeu_ps(fsum + j * C + cb, lm, f[j]);
  }
  channel_sums_avx512(r1, W, C, 1.0f / static_cast<float>(C), mr);
}

WB_AVX512 void scale_pattern_row_avx512(const uint8_t* __restrict mask, idx W, idx C, uint32_t* __restrict out) {
  // spread[n] << dx: bit j of a mask byte's low nibble n to bit 3 j + dx (the ReLU bit above is ignored)
  alignas(64) int32_t spread[3][16];
  for (int n = 0; n < 16; ++n) {
    int32_t bits = 0;
    for (int j = 0; j < kScaleKernels; ++j) bits |= ((n >> j) & 1) << (3 * j);
    for (int dx = 0; dx < 3; ++dx) spread[dx][n] = bits << dx;
  }
  const __m512i t0 = _mm512_load_si512(spread[0]), t1 = _mm512_load_si512(spread[1]),
                t2 = _mm512_load_si512(spread[2]);
  for (idx x = 0; x < W; ++x)
    for (idx cb = 0; cb < C; cb += 16) {
      const __mmask16 lm = lanes_of(C - cb);
      auto column = [&](idx xx) {
        return xx >= 0 && xx < W ? _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, mask + xx * C + cb))
                                 : _mm512_setzero_si512();
      };
      const __m512i w = _mm512_ternarylogic_epi32(_mm512_permutexvar_epi32(column(x - 1), t0),
                                                  _mm512_permutexvar_epi32(column(x), t1),
                                                  _mm512_permutexvar_epi32(column(x + 1), t2), 0xFE);
      _mm512_mask_storeu_epi32(out + x * C + cb, lm, w);
    }
}

WB_AVX512 void sweep1_backward_row_avx512(float* out, const float* addend, const float* const* grows,
                                          const uint32_t* const prows[3], const float* __restrict pix,
                                          const float* K1f, const float* Ksf, const float* gf, idx W, idx C) {
  const __m512 zero = _mm512_setzero_ps();
  const float inv_c = 1.0f / static_cast<float>(C);
  // table[j][dy][i] = sum_dx Ksf[j][dy][dx] * bit dx of i (i mod 8)
  alignas(64) float table[kScaleKernels][3][16];
  if (gf)
    for (int j = 0; j < kScaleKernels; ++j)
      for (int dy = 0; dy < 3; ++dy)
        for (int i = 0; i < 16; ++i) {
          float t = 0.f;
          for (int dx = 0; dx < 3; ++dx)
            if ((i >> dx) & 1) t += Ksf[9 * j + 3 * dy + dx];
          table[j][dy][i] = t;
        }
  for (idx cb = 0; cb < C; cb += 16) {
    const __mmask16 lm = lanes_of(C - cb);
    __m512 g[kScaleKernels];
    for (int j = 0; j < kScaleKernels; ++j) g[j] = gf ? _mm512_maskz_loadu_ps(lm, gf + j * C + cb) : zero;
    Window3 ge;
    if (grows) ge.start(grows, W, C, cb, lm);
    for (idx x = 0; x < W; ++x) {
      if (x > 0 && grows) ge.slide(grows, x, W, C, cb, lm);
      __m512 v = grows ? _mm512_add_ps(ge.apply(K1f), _mm512_set1_ps(pix[x] * inv_c)) : zero;
      if (gf) {
        __m512 coef[kScaleKernels];
        for (int j = 0; j < kScaleKernels; ++j) coef[j] = zero;
        for (int dy = 0; dy < 3; ++dy) {
          if (prows[dy] == nullptr) continue;
          const __m512i w = _mm512_maskz_loadu_epi32(lm, prows[dy] + x * C + cb);
          for (int j = 0; j < kScaleKernels; ++j) {
            const __m512i index = j == 0 ? w : _mm512_srli_epi32(w, 3 * j);
            coef[j] = _mm512_add_ps(coef[j], _mm512_permutexvar_ps(index, _mm512_load_ps(table[j][dy])));
          }
        }
        for (int j = 0; j < kScaleKernels; ++j) v = _mm512_fmadd_ps(coef[j], g[j], v);
      }
      float* dst = out + x * C + cb;
      if (addend) v = _mm512_add_ps(_mm512_maskz_loadu_ps(lm, addend + x * C + cb), v);
      store_block(dst, lm, v);
    }
  }
}

WB_AVX512 void stencil_row_avx512(float* __restrict out, const float* const rows[3], const float* K, idx W, idx C) {
  for (idx cb = 0; cb < C; cb += 16) {
    const __mmask16 lm = lanes_of(C - cb);
    Window3 win;
    win.start(rows, W, C, cb, lm);
    for (idx x = 0; x < W; ++x) {
      if (x > 0) win.slide(rows, x, W, C, cb, lm);
      store_block(out + x * C + cb, lm, win.apply(K));
    }
  }
}

WB_AVX512 void noise_tail_row_avx512(const float* __restrict h, const float* __restrict mu,
                                     const float* __restrict pix, const float* __restrict eps,
                                     const float* __restrict scale, float* __restrict out, float* __restrict mult,
                                     float* __restrict a_out, float k, float cl, float lo, idx W, idx C,
                                     double* mstats) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), kv = _mm512_set1_ps(k),
               clv = _mm512_set1_ps(cl), lov = _mm512_set1_ps(lo), sign = _mm512_set1_ps(-0.0f);
  for (idx cb = 0; cb < C; cb += 16) {
    const __mmask16 lm = lanes_of(C - cb);
    const __m512 s = _mm512_maskz_loadu_ps(lm, scale + cb);
    __m512 msum = zero, msq = zero;
    for (idx x = 0; x < W; ++x) {
      const idx o = x * C + cb;
      const __m512 av = _mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(lm, mu + o), _mm512_set1_ps(pix[x])),
                                      _mm512_maskz_loadu_ps(lm, eps + o));
      const __m512 z = softplus512(av);
      const __m512 m = _mm512_fmadd_ps(kv, _mm512_fmsub_ps(s, z, one), one);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lm, h + o), m);
      store_block(a_out + o, lm, av);
      if (mult) store_block(mult + o, lm, m);
      store_block(out + o, lm, _mm512_max_ps(_mm512_min_ps(v, clv), lov));
      if (mstats) {
        const __m512 mm = _mm512_maskz_mov_ps(lm, m);
        msum = _mm512_add_ps(msum, mm);
        msq = _mm512_fmadd_ps(mm, mm, msq);
      }
    }
    if (mstats) {
      mstats[0] += _mm512_reduce_add_ps(msum);
      mstats[1] += _mm512_reduce_add_ps(msq);
    }
  }
}

WB_AVX512 void noise_tail_backward_row_avx512(const float* __restrict h, const float* __restrict mult,
                                              const float* __restrict a, const float* __restrict g_out,
                                              const float* __restrict scale, float* __restrict g_x,
                                              float* __restrict g_mu, float* __restrict g_mu_sum,
                                              float* __restrict acc, float k, float cl, float lo, idx W, idx C) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), kv = _mm512_set1_ps(k),
               clv = _mm512_set1_ps(cl), lov = _mm512_set1_ps(lo), sign = _mm512_set1_ps(-0.0f);
  for (idx cb = 0; cb < C; cb += 16) {
    const __mmask16 lm = lanes_of(C - cb);
    const __m512 s = _mm512_maskz_loadu_ps(lm, scale + cb);
    __m512 sacc = zero;
    for (idx x = 0; x < W; ++x) {
      const idx o = x * C + cb;
      const __m512 av = _mm512_maskz_loadu_ps(lm, a + o);
      const __m512 e = exp512(_mm512_or_ps(av, sign));
      const __m512 z = softplus512(av);
      const __m512 hv = _mm512_maskz_loadu_ps(lm, h + o);
      const __m512 m = mult ? _mm512_maskz_loadu_ps(lm, mult + o) : _mm512_fmadd_ps(kv, _mm512_fmsub_ps(s, z, one), one);
      // clamp(max=clip) passes the gradient where h m <= clip, the ReLU (lo = 0) where h m > 0
      const __m512 v = _mm512_mul_ps(hv, m);
      const __mmask16 pass = _mm512_mask_cmp_ps_mask(_mm512_mask_cmp_ps_mask(lm, v, clv, _CMP_LE_OQ), v, lov,
                                                     _CMP_GT_OQ);
      // loaded under the lane mask and zeroed after: a load masked by `pass` would wait for the whole chain above
      const __m512 go = _mm512_maskz_mov_ps(pass, _mm512_maskz_loadu_ps(lm, g_out + o));
      const __m512 gm = _mm512_mul_ps(_mm512_mul_ps(go, hv), kv);
      const __m512 r = reciprocal512(_mm512_add_ps(one, e));
      const __m512 sig = _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(av, zero, _CMP_LT_OQ), e, r);
      sacc = _mm512_fmadd_ps(gm, z, sacc);
      const __m512 gmu = _mm512_mul_ps(_mm512_mul_ps(gm, s), sig);
      store_block(g_x + o, lm, _mm512_mul_ps(go, m));
      store_block(g_mu + o, lm, gmu);
    }
    _mm512_mask_storeu_ps(acc + cb, lm, _mm512_add_ps(_mm512_maskz_loadu_ps(lm, acc + cb), sacc));
  }
  channel_sums_avx512(g_mu, W, C, 1.0f, g_mu_sum);
}

template <bool kTraining>
WB_AVX512 void prepass_row_avx512(const float* const hrows[3], const float* Ks, idx W, idx C,
                                  float* __restrict mh, uint8_t* __restrict mask, float* __restrict fsum) {
  if constexpr (kTraining) {
    const __m512 zero = _mm512_setzero_ps();
    for (idx cb = 0; cb < C; cb += 16) {
      const __mmask16 lm = lanes_of(C - cb);
      __m512 f[kScaleKernels];
      for (int j = 0; j < kScaleKernels; ++j) f[j] = zero;
      // relu sums and mask bits of the pixels x .. x + n - 1 whose stencils are in s
      auto finish = [&](idx x, int n, __m512 (*s)[kScaleKernels]) {
        for (int p = 0; p < n; ++p) {
          __m128i bits = _mm_setzero_si128();
          for (int j = 0; j < kScaleKernels; ++j) {
            const __mmask16 sp = _mm512_mask_cmp_ps_mask(lm, s[p][j], zero, _CMP_GT_OQ);
            f[j] = _mm512_mask_add_ps(f[j], sp, f[j], s[p][j]);
            // distinct bits: + is |
            bits = _mm_mask_add_epi8(bits, sp, bits, _mm_set1_epi8(static_cast<char>(1 << j)));
          }
          if (mask) store_block(mask + (x + p) * C + cb, lm, bits);
        }
      };
      idx x = 0;
      for (; x + 3 < W; x += 4) {
        __m512 s[4][kScaleKernels];
        scale_stencils<4>(hrows, Ks, x, W, C, cb, lm, s);
        finish(x, 4, s);
      }
      for (; x + 1 < W; x += 2) {
        __m512 s[2][kScaleKernels];
        scale_stencils<2>(hrows, Ks, x, W, C, cb, lm, s);
        finish(x, 2, s);
      }
      if (x < W) {
        __m512 s[1][kScaleKernels];
        scale_stencils<1>(hrows, Ks, x, W, C, cb, lm, s);
        finish(x, 1, s);
      }
      for (int j = 0; j < kScaleKernels; ++j) _mm512_mask_storeu_ps(fsum + j * C + cb, lm, f[j]);
    }
  }
  channel_sums_avx512(hrows[1], W, C, 1.0f / static_cast<float>(C), mh);
}

WB_AVX512 void e1_row_avx512(const float* const hrows[3], const float* __restrict pix, const float* K1, idx W, idx C,
                             float* __restrict r1, uint16_t* __restrict relu_bits, float* __restrict mr) {
  const idx blocks = relu_bit_blocks(C);
  const __m512 zero = _mm512_setzero_ps();
  for (idx cb = 0; cb < C; cb += 16) {
    const __mmask16 lm = lanes_of(C - cb);
    Window3 win;
    win.start(hrows, W, C, cb, lm);
    for (idx x = 0; x < W; ++x) {
      if (x > 0) win.slide(hrows, x, W, C, cb, lm);
      const __m512 ev = _mm512_add_ps(win.apply(K1), _mm512_set1_ps(pix[x]));
      const __mmask16 pos = _mm512_mask_cmp_ps_mask(lm, ev, zero, _CMP_GT_OQ);
      const __m512 rv = _mm512_maskz_mov_ps(pos, ev);
      store_block(r1 + x * C + cb, lm, rv);
      if (relu_bits) relu_bits[x * blocks + cb / 16] = pos;
    }
  }
  channel_sums_avx512(r1, W, C, 1.0f / static_cast<float>(C), mr);
}

template <bool kGradient>
WB_AVX512 void batch_norm_row_sums_avx512(const float* __restrict a, const float* __restrict b,
                                          const float* __restrict k, idx W, idx C, float* __restrict s1,
                                          float* __restrict s2) {
  for (idx c0 = 0; c0 < C; c0 += 64) {
    __mmask16 lm[4];
    __m512 centre[4], first[4], second[4];
    for (int j = 0; j < 4; ++j) {
      const idx cb = c0 + 16 * j;
      lm[j] = cb < C ? lanes_of(C - cb) : static_cast<__mmask16>(0);
      centre[j] = _mm512_maskz_loadu_ps(lm[j], k + cb);
      first[j] = second[j] = _mm512_setzero_ps();
    }
    for (idx x = 0; x < W; ++x) {
      for (int j = 0; j < 4; ++j) {
        const idx o = x * C + c0 + 16 * j;
        const __m512 v = _mm512_maskz_loadu_ps(lm[j], a + o);
        if constexpr (kGradient) {
          const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(lm[j], b + o), centre[j]);
          first[j] = _mm512_add_ps(first[j], v);
          second[j] = _mm512_fmadd_ps(v, d, second[j]);
        } else {
          const __m512 d = _mm512_sub_ps(v, centre[j]);
          first[j] = _mm512_add_ps(first[j], d);
          second[j] = _mm512_fmadd_ps(d, d, second[j]);
        }
      }
    }
    for (int j = 0; j < 4; ++j) {
      _mm512_mask_storeu_ps(s1 + c0 + 16 * j, lm[j], first[j]);
      _mm512_mask_storeu_ps(s2 + c0 + 16 * j, lm[j], second[j]);
    }
  }
}

WB_AVX512 void relu_backward_row_avx512(const uint16_t* __restrict relu_bits, const float* __restrict g_r1,
                                        const float* __restrict g_mr, float* __restrict ge, float* __restrict gsum,
                                        idx W, idx C) {
  const float inv_c = 1.0f / static_cast<float>(C);
  const idx blocks = relu_bit_blocks(C);
  for (idx x = 0; x < W; ++x) {
    const __m512 shift = _mm512_set1_ps(g_mr[x] * inv_c);
    __m512 sum = _mm512_setzero_ps();
    for (idx cb = 0; cb < C; cb += 16) {
      const __mmask16 lm = lanes_of(C - cb);
      const idx o = x * C + cb;
      const __mmask16 on = static_cast<__mmask16>(relu_bits[x * blocks + cb / 16]);
      const __m512 v = _mm512_maskz_add_ps(on, _mm512_maskz_loadu_ps(lm, g_r1 + o), shift);
      store_block(ge + o, lm, v);
      sum = _mm512_add_ps(sum, v);
    }
    gsum[x] = _mm512_reduce_add_ps(sum);
  }
}

WB_AVX512 void pool_rows_avx512(const float* const v[2], const float* const a[2], const float* const h[2],
                                const float* __restrict scale, float k, idx Wp, idx C, float cl, float lo,
                                float* __restrict out, const PooledKeep& keep) {
  const __m512 clv = _mm512_set1_ps(cl), lov = _mm512_set1_ps(lo), zero = _mm512_setzero_ps(),
               one = _mm512_set1_ps(1.0f), kv = _mm512_set1_ps(k), sign = _mm512_set1_ps(-0.0f);
  auto bounded = [&](__m512 x) { return _mm512_max_ps(_mm512_min_ps(x, clv), lov); };
  for (idx xp = 0; xp < Wp; ++xp) {
    const idx o = 2 * xp * C, po = xp * C;
    for (idx cb = 0; cb < C; cb += 16) {
      const __mmask16 lm = lanes_of(C - cb);
      auto at = [&](const float* const rows[2], int dy, int dx) {
        return _mm512_maskz_loadu_ps(lm, rows[dy] + o + dx * C + cb);
      };
      const __m512 v00 = at(v, 0, 0), v01 = at(v, 0, 1), v10 = at(v, 1, 0), v11 = at(v, 1, 1);
      const __m512 c00 = bounded(v00), c01 = bounded(v01), c10 = bounded(v10), c11 = bounded(v11);
      const __mmask16 right_top = _mm512_cmp_ps_mask(c01, c00, _CMP_GT_OQ);
      const __mmask16 right_bottom = _mm512_cmp_ps_mask(c11, c10, _CMP_GT_OQ);
      const __m512 ct = _mm512_mask_blend_ps(right_top, c00, c01), cbo = _mm512_mask_blend_ps(right_bottom, c10, c11);
      const __mmask16 lower = _mm512_cmp_ps_mask(cbo, ct, _CMP_GT_OQ);
      store_block(out + po + cb, lm, _mm512_mask_blend_ps(lower, ct, cbo));
      if (keep.code == nullptr) continue;
      // the winner's v, a and h
      auto winner = [&](const float* const rows[2]) {
        const __m512 top = _mm512_mask_blend_ps(right_top, at(rows, 0, 0), at(rows, 0, 1));
        const __m512 bottom = _mm512_mask_blend_ps(right_bottom, at(rows, 1, 0), at(rows, 1, 1));
        return _mm512_mask_blend_ps(lower, top, bottom);
      };
      const __m512 vw = _mm512_mask_blend_ps(lower, _mm512_mask_blend_ps(right_top, v00, v01),
                                             _mm512_mask_blend_ps(right_bottom, v10, v11));
      const __m512 aw = winner(a), hw = winner(h);
      const __mmask16 passes = _mm512_mask_cmp_ps_mask(_mm512_mask_cmp_ps_mask(lm, vw, clv, _CMP_LE_OQ), vw, lov,
                                                       _CMP_GT_OQ);
      const __m128i place_top = _mm_maskz_mov_epi8(right_top, _mm_set1_epi8(1));
      const __m128i place_bottom = _mm_mask_blend_epi8(right_bottom, _mm_set1_epi8(2), _mm_set1_epi8(3));
      const __m128i place = _mm_mask_blend_epi8(lower, place_top, place_bottom);
      store_block(keep.code + po + cb, lm, _mm_mask_blend_epi8(passes, _mm_set1_epi8(kNoWinner), place));
      // the multiplier exactly as noise_tail_row_avx512 made it, and its derivatives
      const __m512 s = _mm512_maskz_loadu_ps(lm, scale + cb);
      const __m512 e = exp512(_mm512_or_ps(aw, sign));
      const __m512 z = softplus512(aw);
      const __m512 m = _mm512_fmadd_ps(kv, _mm512_fmsub_ps(s, z, one), one);
      const __m512 r = reciprocal512(_mm512_add_ps(one, e));
      const __m512 sig = _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(aw, zero, _CMP_LT_OQ), e, r);
      const __m512 hk = _mm512_mul_ps(hw, kv);
      store_block(keep.m + po + cb, lm, m);
      store_block(keep.d + po + cb, lm, _mm512_mul_ps(_mm512_mul_ps(hk, s), sig));
      store_block(keep.p + po + cb, lm, _mm512_maskz_mov_ps(passes, _mm512_mul_ps(hk, z)));
    }
  }
}

WB_AVX512 void unpool_row_avx512(const float* __restrict g_pool, const uint8_t* __restrict code,
                                 const float* __restrict mw, const float* __restrict dw, idx y, idx Hp, idx Wp, idx W,
                                 idx C, float* __restrict g_x, float* __restrict g_mu, float* __restrict g_mu_sum) {
  const __m512 zero = _mm512_setzero_ps();
  idx x = 0;
  if (y / 2 < Hp) {
    for (; x < 2 * Wp; ++x) {
      const idx po = x / 2 * C, o = x * C;
      const __m128i place = _mm_set1_epi8(static_cast<char>(2 * (y & 1) + (x & 1)));
      __m512 sum = zero;
      for (idx cb = 0; cb < C; cb += 16) {
        const __mmask16 lm = lanes_of(C - cb);
        const __mmask16 won = _mm_mask_cmpeq_epi8_mask(lm, _mm_maskz_loadu_epi8(lm, code + po + cb), place);
        const __m512 g = _mm512_maskz_loadu_ps(won, g_pool + po + cb);
        const __m512 gmu = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(won, dw + po + cb));
        store_block(g_x + o + cb, lm, _mm512_mul_ps(g, _mm512_maskz_loadu_ps(won, mw + po + cb)));
        store_block(g_mu + o + cb, lm, gmu);
        sum = _mm512_add_ps(sum, gmu);
      }
      g_mu_sum[x] = _mm512_reduce_add_ps(sum);
    }
  }
  for (; x < W; ++x) {
    for (idx cb = 0; cb < C; cb += 16) {
      store_block(g_x + x * C + cb, lanes_of(C - cb), zero);
      store_block(g_mu + x * C + cb, lanes_of(C - cb), zero);
    }
    g_mu_sum[x] = 0.f;
  }
}

template void sweep1_row_avx512<true>(const float* const hrows[3], const float* __restrict pix, const float* K1,
                                      const float* Ks, idx W, idx C, float* __restrict r1, uint8_t* __restrict mask,
                                      float* __restrict mr, float* __restrict fsum);
template void sweep1_row_avx512<false>(const float* const hrows[3], const float* __restrict pix, const float* K1,
                                       const float* Ks, idx W, idx C, float* __restrict r1, uint8_t* __restrict mask,
                                       float* __restrict mr, float* __restrict fsum);
template void prepass_row_avx512<true>(const float* const hrows[3], const float* Ks, idx W, idx C,
                                       float* __restrict mh, uint8_t* __restrict mask, float* __restrict fsum);
template void prepass_row_avx512<false>(const float* const hrows[3], const float* Ks, idx W, idx C,
                                        float* __restrict mh, uint8_t* __restrict mask, float* __restrict fsum);
template void batch_norm_row_sums_avx512<true>(const float* __restrict a, const float* __restrict b,
                                               const float* __restrict k, idx W, idx C, float* __restrict s1,
                                               float* __restrict s2);
template void batch_norm_row_sums_avx512<false>(const float* __restrict a, const float* __restrict b,
                                                const float* __restrict k, idx W, idx C, float* __restrict s1,
                                                float* __restrict s2);
#else
bool cpu_has_avx512() { return false; }
#endif  // WB_HAS_AVX512_PATH

// Which row kernels the sweeps use: the AVX-512 ones where the CPU has them, unless switched off (tests run both).
std::atomic<bool>& use_avx512() {
  static std::atomic<bool> flag{WB_HAS_AVX512_PATH && cpu_has_avx512()};
  return flag;
}

}  // namespace wb
