// Shared by every part of the fused CPU kernels for the MetaPerturb perturbation site (see workbench/_native.py for
// the maths and the autograd wiring). All maps are NHWC (channels_last memory), so every 3x3 stencil is a three-row
// sweep over contiguous W*C floats with shifts of +-C, and the channel loop vectorises for any C.
//
// The parts: vector_math.h (scalar polynomials), avx512_math.h (the same in registers), noise (the in-kernel
// normals), rows_generic (compiler-vectorised rows), rows_avx512 (hand-vectorised rows), rings.h (row rings),
// params.h (the parameter structs), tensors (map buffers and tensor plumbing), sweeps (the two-sweep site),
// fused_site (the fused site's passes and its scale), batch_norm (a BatchNorm folded into the site), autograd (the
// fused site as one autograd node) and bindings (the Python module).
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#define WB_HAS_AVX512_PATH 1
#define WB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#else
#define WB_HAS_AVX512_PATH 0
#endif

namespace wb {

using idx = int64_t;

struct Geometry {
  idx B, H, W, C;
  idx row() const { return W * C; }
};

constexpr int kScaleKernels = 4;
constexpr int32_t kReluBit = 1 << kScaleKernels;

// The fused site keeps E1's ReLU bits as one 16-bit word a pixel and 16-channel block (a compare's mask as it is):
// the words a pixel of C channels takes
constexpr idx relu_bit_blocks(idx C) { return (C + 15) / 16; }

// Whether this CPU has AVX-512 F, BW, VL and DQ (false where the AVX-512 rows are not built).
bool cpu_has_avx512();

// Which row kernels the sweeps use: the AVX-512 ones where the CPU has them, unless switched off (tests run both).
std::atomic<bool>& use_avx512();

}  // namespace wb
