// The in-kernel noise: standard normals from a counter-based generator, so that the values depend only on the seed
// and the element index (not on threads or row splits), and torch.manual_seed reproduces a run.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace wb {

constexpr int kNoiseBlock = 32;  // normals per block

// Normals for NHWC-linear element indices [start, start + n) into dst; scratch: a buffer the caller keeps between
// calls. avx512: draw with the AVX-512 form (the same numbers to rounding).
void draw_normals(float* dst, idx start, idx n, uint64_t seed, std::vector<float>& scratch, bool avx512);

// Normals for element indices [0, n) into dst, split between torch's threads (the standalone draw).
void draw_normals_parallel(float* dst, idx n, uint64_t seed, bool avx512);

}  // namespace wb
