// Counter-based SplitMix64 (Steele, Lea and Flood 2014; the generator behind Java's SplittableRandom and the seeding
// of xoshiro, which passes BigCrush): pair i of normals comes from mix64(seed + (i + 1) gamma), its low word the
// Box-Muller radius and its high word the angle. Block k holds elements 32 k .. 32 k + 31: element 32 k + l is the
// cosine normal of pair 16 k + l and element 32 k + 16 + l its sine normal (l < 16), so that sixteen pairs fill two
// registers with no shuffle, and the values depend only on the element index, not on threads or row splits.
// It replaced Philox4x32-10 (ten rounds of multiplies per four words) with the same distribution and less work per
// normal.
#include "noise.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "avx512_math.h"
#include "vector_math.h"

namespace wb {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;

__attribute__((always_inline)) inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr float kHalfPi = 1.57079632679489662f;

__attribute__((always_inline)) inline void box_muller(uint32_t a, uint32_t b, float& n0, float& n1) {
  const float u1 = static_cast<float>(static_cast<int32_t>((a >> 8) + 1u)) * (1.0f / 16777216.0f);  // (0, 1]
  const float radius = std::sqrt(-2.0f * fast_log(u1));
  // the angle q pi/2 + x, uniform on the circle: the quadrant q from b's top two bits, x in [-pi/4, pi/4) from its
  // next 23 (the mantissa of a float in [1, 2))
  const uint32_t quadrant = b >> 30;
  const float f = bits_to_float(0x3F800000u | ((b << 2) >> 9));
  const float x = std::fma(f, kHalfPi, -1.5f * kHalfPi);
  const float z = x * x;
  const float s = ((-1.9515295891E-4f * z + 8.3321608736E-3f) * z - 1.6666654611E-1f) * z * x + x;
  const float c = ((2.443315711809948E-5f * z - 1.388731625493765E-3f) * z + 4.166664568298827E-2f) * z * z -
                  0.5f * z + 1.0f;
  const float sin_v = quadrant == 0 ? s : quadrant == 1 ? c : quadrant == 2 ? -s : -c;
  const float cos_v = quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
  n0 = radius * cos_v;
  n1 = radius * sin_v;
}

// The 32 normals of noise block k into out[0 .. 32).
void normals_block(uint64_t k, uint64_t seed, float* __restrict out) {
  for (int l = 0; l < kNoiseBlock / 2; ++l) {
    const uint64_t z = mix64(seed + (16 * k + static_cast<uint64_t>(l) + 1) * kGamma);
    box_muller(static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32), out[l], out[l + kNoiseBlock / 2]);
  }
}

#if WB_HAS_AVX512_PATH
// ---- noise: SplitMix64 and Box-Muller in registers (the draw of normals_block)

WB_AVX512 inline void box_muller512(__m512i a, __m512i b, __m512& n0, __m512& n1) {
  const __m512 u1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_srli_epi32(a, 8), _mm512_set1_epi32(1))),
                                  _mm512_set1_ps(1.0f / 16777216.0f));  // (0, 1]
  const __m512 radius = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log512(u1)));
  const __m512 f = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_srli_epi32(_mm512_slli_epi32(b, 2), 9), _mm512_set1_epi32(0x3F800000)));
  const __m512 x = _mm512_fmadd_ps(f, _mm512_set1_ps(kHalfPi), _mm512_set1_ps(-1.5f * kHalfPi));
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 s = _mm512_fmadd_ps(_mm512_set1_ps(-1.9515295891E-4f), z, _mm512_set1_ps(8.3321608736E-3f));
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(-1.6666654611E-1f));
  s = _mm512_fmadd_ps(_mm512_mul_ps(s, z), x, x);
  __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(2.443315711809948E-5f), z, _mm512_set1_ps(-1.388731625493765E-3f));
  c = _mm512_fmadd_ps(c, z, _mm512_set1_ps(4.166664568298827E-2f));
  c = _mm512_fmadd_ps(_mm512_mul_ps(c, z), z, _mm512_fmadd_ps(_mm512_set1_ps(-0.5f), z, _mm512_set1_ps(1.0f)));
  // quadrant q = b >> 30: 0 (sin s, cos c), 1 (c, -s), 2 (-s, -c), 3 (-c, s): odd q swaps the two, the sine's sign is
  // q's high bit (b's bit 31) and the cosine's the xor of q's two bits; t ^ (sign bit of m) is ternary logic 0x78
  const __mmask16 swap = _mm512_test_epi32_mask(b, _mm512_set1_epi32(1 << 30));
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i sin_v = _mm512_ternarylogic_epi32(_mm512_castps_si512(_mm512_mask_blend_ps(swap, s, c)), b, sign, 0x78);
  const __m512i cos_v = _mm512_ternarylogic_epi32(_mm512_castps_si512(_mm512_mask_blend_ps(swap, c, s)),
                                                  _mm512_xor_si512(b, _mm512_slli_epi32(b, 1)), sign, 0x78);
  n0 = _mm512_mul_ps(radius, _mm512_castsi512_ps(cos_v));
  n1 = _mm512_mul_ps(radius, _mm512_castsi512_ps(sin_v));
}

WB_AVX512 inline __m512i mix64_512(__m512i z) {
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64(0xBF58476D1CE4E5B9ll));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64(0x94D049BB133111EBll));
  return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

// normals_block for blocks k0 .. k0 + blocks - 1 into out[0 .. 32 blocks): each block's sixteen counters in two
// registers of 64-bit lanes, their low and high words gathered into one register each for the Box-Muller
WB_AVX512 void normals_blocks_avx512(uint64_t k0, idx blocks, uint64_t seed, float* __restrict out) {
  const __m512i gamma = _mm512_set1_epi64(static_cast<long long>(kGamma));
  const __m512i lanes = _mm512_mullo_epi64(_mm512_setr_epi64(1, 2, 3, 4, 5, 6, 7, 8), gamma);
  const __m512i eight = _mm512_mullo_epi64(_mm512_set1_epi64(8), gamma);
  const __m512i lo_words = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i hi_words = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (idx i = 0; i < blocks; ++i) {
    const uint64_t k = k0 + static_cast<uint64_t>(i);
    const __m512i base = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(seed + 16 * k * kGamma)), lanes);
    const __m512i z0 = mix64_512(base), z1 = mix64_512(_mm512_add_epi64(base, eight));
    __m512 n0, n1;
    box_muller512(_mm512_permutex2var_epi32(z0, lo_words, z1), _mm512_permutex2var_epi32(z0, hi_words, z1), n0, n1);
    _mm512_storeu_ps(out + kNoiseBlock * i, n0);
    _mm512_storeu_ps(out + kNoiseBlock * i + 16, n1);
  }
}
#endif  // WB_HAS_AVX512_PATH

}  // namespace

void draw_normals(float* dst, idx start, idx n, uint64_t seed, std::vector<float>& scratch, bool avx512) {
  const idx k0 = start / kNoiseBlock, k1 = (start + n + kNoiseBlock - 1) / kNoiseBlock;
  scratch.resize(static_cast<size_t>(kNoiseBlock * (k1 - k0)));
#if WB_HAS_AVX512_PATH
  if (avx512)
    normals_blocks_avx512(static_cast<uint64_t>(k0), k1 - k0, seed, scratch.data());
  else
#endif
    for (idx k = k0; k < k1; ++k)
      normals_block(static_cast<uint64_t>(k), seed, scratch.data() + kNoiseBlock * (k - k0));
  std::memcpy(dst, scratch.data() + (start - kNoiseBlock * k0), static_cast<size_t>(n) * sizeof(float));
}

void draw_normals_parallel(float* dst, idx n, uint64_t seed, bool avx512) {
  const idx chunk = 4096;
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](idx c0, idx c1) {
    std::vector<float> scratch;
    for (idx c = c0; c < c1; ++c) {
      const idx start = c * chunk, len = std::min(chunk, n - start);
      draw_normals(dst + start, start, len, seed, scratch, avx512);
    }
  });
}

}  // namespace wb
