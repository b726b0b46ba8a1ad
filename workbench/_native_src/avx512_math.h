// The vector math of the AVX-512 rows: lane masks, block stores and the polynomials of vector_math.h (and the
// softplus table) sixteen lanes at a time. Included by the AVX-512 parts only.
#pragma once

#include "common.h"

#if WB_HAS_AVX512_PATH
namespace wb {

WB_AVX512 inline __mmask16 lanes_of(idx n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// Stores of a block: full-width when every lane is in use (masked stores are slow on some cores, e.g. AMD Zen 4).
WB_AVX512 inline void store_block(float* p, __mmask16 lm, __m512 v) {
  if (lm == 0xFFFF) _mm512_storeu_ps(p, v); else _mm512_mask_storeu_ps(p, lm, v);
}
WB_AVX512 inline void store_block(uint8_t* p, __mmask16 lm, __m128i v) {
  if (lm == 0xFFFF) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); else _mm_mask_storeu_epi8(p, lm, v);
}

// fast_exp, fast_log1p_unit, softplus and sigmoid_of (vector_math.h), sixteen lanes at a time (same polynomials)
WB_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, x), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, _mm512_max_ps(n, _mm512_set1_ps(-126.0f)));
}

// fast_log of positive normal floats
WB_AVX512 inline __m512 log512(__m512 u) {
  const __m512 one = _mm512_set1_ps(1.0f);
  // u = m 2^ex with m in [0.5, 1)
  __m512 ex = _mm512_add_ps(_mm512_getexp_ps(u), one);
  __m512 m = _mm512_getmant_ps(u, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);
  const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  ex = _mm512_mask_sub_ps(ex, small, ex, one);
  m = _mm512_sub_ps(_mm512_mask_add_ps(m, small, m, m), one);
  const __m512 z = _mm512_mul_ps(m, m);
  __m512 y = _mm512_set1_ps(7.0376836292E-2f);
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.1514610310E-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.1676998740E-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.2420140846E-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.4249322787E-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.6668057665E-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(2.0000714765E-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-2.4999993993E-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(3.3333331174E-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, z), m);
  y = _mm512_fmadd_ps(ex, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fmadd_ps(z, _mm512_set1_ps(-0.5f), y);
  return _mm512_fmadd_ps(ex, _mm512_set1_ps(0.693359375f), _mm512_add_ps(m, y));
}

// softplus(a) = max(a, 0) + log1p(exp(-|a|)) with the second term from a table: 32 intervals of width 1/2 over
// [0, 16), a degree-5 polynomial each (least squares on Chebyshev nodes: scripts/fit_softplus.py fits it and measures
// 4.6e-8 absolute and 1.4e-7 relative error in float32 below 16), clamped at 16, where the term is 1.1e-7. Six
// two-register permutes and five FMAs in place of an exp and a log1p (about twenty multiplies).
alignas(64) constexpr float kSoftplusTable[6][32] = {
    {5.759394169e-01f, 3.868710101e-01f, 2.519290745e-01f, 1.602241546e-01f, 1.002065614e-01f, 6.196758896e-02f,
     3.804137185e-02f, 2.324546501e-02f, 1.416345686e-02f, 8.614484221e-03f, 5.233798176e-03f, 3.177726408e-03f,
     1.928593265e-03f, 1.170194708e-03f, 7.099223440e-04f, 4.306498158e-04f, 2.612244280e-04f, 1.584487763e-04f,
     9.610703273e-05f, 5.829296424e-05f, 3.535687574e-05f, 2.144517930e-05f, 1.300721306e-05f, 7.889293556e-06f,
     4.785105830e-06f, 2.902316282e-06f, 1.760344730e-06f, 1.067703465e-06f, 6.475950158e-07f, 3.927862906e-07f,
     2.382369360e-07f, 1.444980171e-07f},
    {-4.378235042e-01f, -3.208213151e-01f, -2.227001339e-01f, -1.480471939e-01f, -9.534946084e-02f, -6.008664891e-02f,
     -3.732688725e-02f, -2.297737077e-02f, -1.406362746e-02f, -8.577485569e-03f, -5.220125895e-03f, -3.172682831e-03f,
     -1.926734694e-03f, -1.169510302e-03f, -7.096704212e-04f, -4.305570910e-04f, -2.611903183e-04f, -1.584362180e-04f,
     -9.610241250e-05f, -5.829126530e-05f, -3.535625001e-05f, -2.144494829e-05f, -1.300712847e-05f, -7.889262633e-06f,
     -4.785094461e-06f, -2.902311962e-06f, -1.760343252e-06f, -1.067702897e-06f, -6.475947885e-07f, -3.927862053e-07f,
     -2.382369075e-07f, -1.444980029e-07f},
    {1.230663806e-01f, 1.089473888e-01f, 8.655270934e-02f, 6.306494772e-02f, 4.312915727e-02f, 2.823817730e-02f,
     1.796678640e-02f, 1.122467872e-02f, 6.932895165e-03f, 4.251936451e-03f, 2.596424660e-03f, 1.581299701e-03f,
     9.615056333e-04f, 5.840678350e-04f, 3.545812506e-04f, 2.151845547e-04f, 1.305602636e-04f, 7.920507778e-05f,
     4.804629862e-05f, 2.914375546e-05f, 1.767739195e-05f, 1.072217856e-05f, 6.503440090e-06f, 3.944575838e-06f,
     2.392521083e-06f, 1.451142907e-06f, 8.801646914e-07f, 5.338475830e-07f, 3.237952058e-07f, 1.963918237e-07f,
     1.191177006e-07f, 7.224854670e-08f},
    {-5.101087037e-03f, -1.301378291e-02f, -1.600055210e-02f, -1.479722746e-02f, -1.163484529e-02f, -8.281593211e-03f,
     -5.541851278e-03f, -3.569628112e-03f, -2.245970070e-03f, -1.393001759e-03f, -8.564410964e-04f, -5.237564328e-04f,
     -3.192675358e-04f, -1.942342933e-04f, -1.180262407e-04f, -7.166656724e-05f, -4.349744268e-05f, -2.639337981e-05f,
     -1.601238728e-05f, -9.713472537e-06f, -5.892059562e-06f, -3.573913546e-06f, -2.167761295e-06f, -1.314840574e-06f,
     -7.975010590e-07f, -4.837124834e-07f, -2.933877852e-07f, -1.779491896e-07f, -1.079318181e-07f, -6.546402176e-08f,
     -3.970596296e-08f, -2.408289212e-08f},
    {-4.861661233e-03f, -2.786001656e-03f, -2.919815306e-04f, 1.263908227e-03f, 1.726159477e-03f, 1.553478418e-03f,
     1.174777513e-03f, 8.105253801e-04f, 5.307730753e-04f, 3.370850172e-04f, 2.102016879e-04f, 1.296487171e-04f,
     7.943773380e-05f, 4.847843229e-05f, 2.951337592e-05f, 1.794123455e-05f, 1.089681791e-05f, 6.614744507e-06f,
     4.014066235e-06f, 2.435397846e-06f, 1.477417186e-06f, 8.961994808e-07f, 5.436094739e-07f, 3.297294597e-07f,
     1.999960375e-07f, 1.213055754e-07f, 7.357622422e-08f, 4.462648917e-08f, 2.706742386e-08f, 1.641725689e-08f,
     9.957582314e-09f, 6.039583500e-09f},
    {4.929926945e-04f, 1.042254735e-03f, 8.589125937e-04f, 3.815556120e-04f, 2.267757918e-05f, -1.321126038e-04f,
     -1.571081957e-04f, -1.303215249e-04f, -9.368210158e-05f, -6.263603427e-05f, -4.023156362e-05f, -2.524956108e-05f,
     -1.563191290e-05f, -9.599166333e-06f, -5.865845651e-06f, -3.573936965e-06f, -2.173646863e-06f, -1.320573460e-06f,
     -8.017746040e-07f, -4.865976280e-07f, -2.952455986e-07f, -1.791157018e-07f, -1.086539427e-07f, -6.590738622e-08f,
     -3.997685383e-08f, -2.424792278e-08f, -1.470737931e-08f, -8.920576278e-09f, -5.410639936e-09f, -3.281732441e-09f,
     -1.990476228e-09f, -1.207286715e-09f},
};

WB_AVX512 inline __m512 softplus512(__m512 a) {
  const __m512 t = _mm512_min_ps(_mm512_andnot_ps(_mm512_set1_ps(-0.0f), a), _mm512_set1_ps(15.999999f));
  const __m512i i = _mm512_cvttps_epi32(_mm512_mul_ps(t, _mm512_set1_ps(2.0f)));
  const __m512 u =
      _mm512_fnmadd_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(0.5f), _mm512_sub_ps(t, _mm512_set1_ps(0.25f)));
  auto coefficient = [&](int d) {
    return _mm512_permutex2var_ps(_mm512_load_ps(kSoftplusTable[d]), i, _mm512_load_ps(kSoftplusTable[d] + 16));
  };
  __m512 y = coefficient(5);
  for (int d = 4; d >= 0; --d) y = _mm512_fmadd_ps(y, u, coefficient(d));
  return _mm512_add_ps(_mm512_max_ps(a, _mm512_setzero_ps()), y);
}

// 1 / d to about 1 ulp: the 14-bit estimate and one Newton step (a division has a fraction of the throughput)
WB_AVX512 inline __m512 reciprocal512(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

}  // namespace wb
#endif  // WB_HAS_AVX512_PATH
