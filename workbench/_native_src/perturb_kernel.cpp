// Fused CPU kernels for the MetaPerturb perturbation site (see workbench/_native.py for the maths and the
// autograd wiring). All maps are NHWC (channels_last memory), so every 3x3 stencil is a three-row sweep over
// contiguous W*C floats with shifts of +-C, and the channel loop vectorises for any C.
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#define WB_HAS_AVX512_PATH 1
#define WB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#else
#define WB_HAS_AVX512_PATH 0
#endif

namespace {

using idx = int64_t;

// ------------------------------------------------------------------------------------------------ vector math
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

// ------------------------------------------------------------------------------------------------ noise
// Counter-based SplitMix64 (Steele, Lea and Flood 2014; the generator behind Java's SplittableRandom and the seeding
// of xoshiro, which passes BigCrush): pair i of normals comes from mix64(seed + (i + 1) gamma), its low word the
// Box-Muller radius and its high word the angle. Block k holds elements 32 k .. 32 k + 31: element 32 k + l is the
// cosine normal of pair 16 k + l and element 32 k + 16 + l its sine normal (l < 16), so that sixteen pairs fill two
// registers with no shuffle, and the values depend only on the element index, not on threads or row splits.
// It replaced Philox4x32-10 (ten rounds of multiplies per four words): 0.9 ms less per forward of a 128x28x28x64
// map (9.3 -> 8.4 ms, 2 threads), with the same distribution.
constexpr int kNoiseBlock = 32;  // normals per block
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

// Normals for NHWC-linear element indices [start, start + n) into dst (see normals_block).
#if WB_HAS_AVX512_PATH
WB_AVX512 void normals_blocks_avx512(uint64_t k0, idx blocks, uint64_t seed, float* __restrict out);
#endif

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

// ------------------------------------------------------------------------------------------------ stencils
// out (=, or += with kAccumulate) sum_{dy, dx} K[3 dy + dx] * rows[dy][x + dx - 1, c]: one 3x3 stencil row in a
// single pass (9 loads, 1 store per element). A null row is zero padding (read from a zero row).
template <bool kAccumulate = false>
void stencil_row(float* __restrict out, const float* const rows[3], const float* K, idx W, idx C) {
  const idx n = W * C;
  static thread_local std::vector<float> zeros;
  if (static_cast<idx>(zeros.size()) < n) zeros.assign(static_cast<size_t>(n), 0.0f);
  const float* __restrict r0 = rows[0] ? rows[0] : zeros.data();
  const float* __restrict r1 = rows[1] ? rows[1] : zeros.data();
  const float* __restrict r2 = rows[2] ? rows[2] : zeros.data();
  const float k00 = K[0], k01 = K[1], k02 = K[2], k10 = K[3], k11 = K[4], k12 = K[5], k20 = K[6], k21 = K[7],
              k22 = K[8];
  if (W == 1) {
    for (idx i = 0; i < n; ++i) {
      const float v = k01 * r0[i] + k11 * r1[i] + k21 * r2[i];
      out[i] = kAccumulate ? out[i] + v : v;
    }
    return;
  }
  for (idx i = 0; i < C; ++i) {
    const float v = k01 * r0[i] + k02 * r0[i + C] + k11 * r1[i] + k12 * r1[i + C] + k21 * r2[i] + k22 * r2[i + C];
    out[i] = kAccumulate ? out[i] + v : v;
  }
  for (idx i = C; i < n - C; ++i) {
    const float v = k00 * r0[i - C] + k01 * r0[i] + k02 * r0[i + C] + k10 * r1[i - C] + k11 * r1[i] +
                    k12 * r1[i + C] + k20 * r2[i - C] + k21 * r2[i] + k22 * r2[i + C];
    out[i] = kAccumulate ? out[i] + v : v;
  }
  for (idx i = n - C; i < n; ++i) {
    const float v = k00 * r0[i - C] + k01 * r0[i] + k10 * r1[i - C] + k11 * r1[i] + k20 * r2[i - C] + k21 * r2[i];
    out[i] = kAccumulate ? out[i] + v : v;
  }
}

// acc[dx] += sum_i g[i] * in[i + (dx-1) C] (zero padded): the weight gradient of one kernel row
inline void hcorr_acc(const float* __restrict g, const float* __restrict in, idx W, idx C, double acc[3]) {
  const idx n = W * C;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s0)
  for (idx i = C; i < n; ++i) s0 += g[i] * in[i - C];
#pragma omp simd reduction(+ : s1)
  for (idx i = 0; i < n; ++i) s1 += g[i] * in[i];
#pragma omp simd reduction(+ : s2)
  for (idx i = 0; i < n - C; ++i) s2 += g[i] * in[i + C];
  acc[0] += s0; acc[1] += s1; acc[2] += s2;
}

inline void corr_row(const float* g, const float* const rows[3], idx W, idx C, double acc[9]) {
  for (int dy = 0; dy < 3; ++dy)
    if (rows[dy]) hcorr_acc(g, rows[dy], W, C, acc + 3 * dy);
}

inline void flip9(const float* K, float* out) { for (int t = 0; t < 9; ++t) out[t] = K[8 - t]; }

// Rows a sweep computes once and reads from the three rows below it: row i lives in slot i % 3, so a sweep moving
// down produces each row when first asked for it and three slots hold every row it still needs.
class RowRing {
 public:
  // The slot of image b's row yy (-1 outside the image), after produce(row, slot) if that row is not held yet.
  template <class Produce>
  int fetch(idx b, idx yy, idx H, Produce&& produce) {
    if (yy < 0 || yy >= H) return -1;
    const idx row = b * H + yy;
    const int slot = static_cast<int>(row % 3);
    if (held_[slot] != row) {
      produce(row, slot);
      held_[slot] = row;
    }
    return slot;
  }

  // Rows yy - 1, yy, yy + 1 of image b, each made by produce when not held: where their values (rw floats a slot,
  // from `values`) and channel sums (sw floats a slot, from `sums`) are, nullptr outside the image; slots[dy] is the
  // slot (-1 outside).
  template <class Produce>
  void window(idx b, idx yy, idx H, Produce&& produce, const float* values, idx rw, const float* sums, idx sw,
              const float* value_rows[3], const float* sum_rows[3], int slots[3] = nullptr) {
    for (int dy = 0; dy < 3; ++dy) {
      const int slot = fetch(b, yy + dy - 1, H, produce);
      value_rows[dy] = slot >= 0 ? values + slot * rw : nullptr;
      sum_rows[dy] = slot >= 0 ? sums + slot * sw : nullptr;
      if (slots) slots[dy] = slot;
    }
  }

 private:
  idx held_[3] = {-1, -1, -1};
};

// Ask for the lines of [p, p + bytes) ahead of use (into L2). The fused forward walks each row of h once per
// 16-channel block, a strided pattern the hardware prefetchers follow too late: on maps that spill the caches it
// waited on those loads (measured: 9% of its time at batch 128, 28x28x64).
inline void prefetch_span(const void* p, idx bytes, bool for_writing = false) {
  const char* c = static_cast<const char*>(p);
  if (for_writing)
    for (idx off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_ET0);
  else
    for (idx off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
}

struct Geometry {
  idx B, H, W, C;
  idx row() const { return W * C; }
};

// rows y-1, y, y+1 of image b in an NHWC buffer with `width` floats per row (nullptr outside the image)
inline void neighbours(const float* base, const Geometry& g, idx b, idx y, idx width, const float* rows[3]) {
  for (int dy = 0; dy < 3; ++dy) {
    const idx yy = y + dy - 1;
    rows[dy] = (yy < 0 || yy >= g.H) ? nullptr : base + (b * g.H + yy) * width;
  }
}

// The rows of h = A x + B (per channel: a BatchNorm fused in front of the site, in its affine form) made from the rows of
// x when a sweep first asks for them and held in four slots (row i in slot i % 4; the fused forward at row r reads
// rows r - 1 .. r + 2, the pre-pass r - 1 .. r + 1), so h itself is never written. Without A it hands out x's rows.
class AffineRows {
 public:
  AffineRows(const float* x, const Geometry& g, const float* A, const float* B)
      : x_(x), A_(A), B_(B), W_(g.W), C_(g.C), H_(g.H), ring_(A ? 4 * g.row() : 0) {}

  const float* row(idx r) {
    const idx rw = W_ * C_;
    if (!A_) return x_ + r * rw;
    const int slot = static_cast<int>(r & 3);
    float* __restrict out = ring_.data() + slot * rw;
    if (held_[slot] != r) {
      const float* __restrict in = x_ + r * rw;
      for (idx p = 0; p < rw; p += C_)
#pragma omp simd
        for (idx c = 0; c < C_; ++c) out[p + c] = in[p + c] * A_[c] + B_[c];
      held_[slot] = r;
    }
    return out;
  }

  // rows y-1, y, y+1 of image b (nullptr outside the image), as neighbours() gives them for a map in memory
  void neighbours(idx b, idx y, const float* rows[3]) {
    for (int dy = 0; dy < 3; ++dy) {
      const idx yy = y + dy - 1;
      rows[dy] = (yy < 0 || yy >= H_) ? nullptr : row(b * H_ + yy);
    }
  }

 private:
  const float* x_;
  const float* A_;
  const float* B_;
  idx W_, C_, H_;
  std::vector<float> ring_;
  idx held_[4] = {-1, -1, -1, -1};
};

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

// Buffers for the kernel's maps, recycled. A fresh 25 MB map costs the kernel about 6000 page faults and as many
// zeroed pages on first touch (measured: clear_page took as much time as the sweep that fills the map), and glibc
// gives large blocks back to the system on free. A training step asks for the same sizes every time, so freed maps
// go to a free list keyed by byte size (at most kPoolBytes held, the rest is freed) and the next request reuses one.
class MapPool {
 public:
  static constexpr size_t kMinBytes = size_t(256) << 10;  // smaller maps are cheap to allocate: torch's allocator
  static constexpr size_t kPoolBytes = size_t(1) << 30;
  static constexpr size_t kAlign = size_t(2) << 20;

  // the block a map of `bytes` takes: whole huge pages for maps that fill one, whole pages otherwise
  static size_t block_bytes(size_t bytes) {
    const size_t unit = bytes >= kAlign ? kAlign : 4096;
    return (bytes + unit - 1) / unit * unit;
  }

  // a block of block_bytes(...) bytes
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        held_ -= bytes;
        return p;
      }
    }
    void* p = std::aligned_alloc(bytes >= kAlign ? kAlign : 4096, bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (p != nullptr) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + bytes <= kPoolBytes) {
        free_[bytes].push_back(p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto freed = static_cast<int64_t>(held_);
    for (auto& [bytes, blocks] : free_)
      for (void* p : blocks) std::free(p);
    free_.clear();
    held_ = 0;
    return freed;
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(held_);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t held_ = 0;
};

MapPool& map_pool() {
  static auto* pool = new MapPool();  // never destroyed: tensors may still return buffers during interpreter exit
  return *pool;
}

// An uninitialised map for the kernel's outputs (from the pool when large).
torch::Tensor empty_map(at::IntArrayRef sizes, at::ScalarType dtype = torch::kFloat) {
  idx numel = 1;
  for (auto v : sizes) numel *= v;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (bytes < MapPool::kMinBytes) return torch::empty(sizes, torch::dtype(dtype));
  const size_t rounded = MapPool::block_bytes(bytes);
  void* p = map_pool().take(rounded);
  TORCH_CHECK(p != nullptr, "native perturb: out of memory allocating ", rounded, " bytes");
  return torch::from_blob(p, sizes, [rounded](void* q) { map_pool().give(q, rounded); }, torch::dtype(dtype));
}

// (B, C, H, W) with channels_last strides over NHWC memory, as a tensor of its own (not a permuted view: autograd
// forbids in-place ops, such as the next layer's ReLU(inplace=True), on view outputs of a Function)
torch::Tensor empty_channels_last(idx B, idx C, idx H, idx W) {
  auto nhwc = empty_map({B, H, W, C});
  auto storage = nhwc.storage();
  return torch::empty({0}, nhwc.options()).set_(storage, 0, {B, C, H, W}, {H * W * C, 1, W * C, C});
}

Geometry geometry(const torch::Tensor& x_nhwc) {
  TORCH_CHECK(x_nhwc.dim() == 4 && x_nhwc.scalar_type() == torch::kFloat && x_nhwc.is_contiguous(),
              "native perturb expects a contiguous float32 NHWC tensor");
  return {x_nhwc.size(0), x_nhwc.size(1), x_nhwc.size(2), x_nhwc.size(3)};
}

// t itself when it is float32 and contiguous (as phi's tensors and the scales are): no dispatcher call, which costs
// microseconds a tensor with the caches cold after a sweep; else a contiguous float32 copy
torch::Tensor float_contiguous(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat && t.is_contiguous() ? t : t.detach().to(torch::kFloat).contiguous();
}

std::vector<float> kernel9(const torch::Tensor& k) {
  auto c = float_contiguous(k);
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

constexpr int kScaleKernels = 4;
constexpr int32_t kReluBit = 1 << kScaleKernels;

// The fused site keeps E1's ReLU bits as one 16-bit word a pixel and 16-channel block (a compare's mask as it is):
// the words a pixel of C channels takes
constexpr idx relu_bit_blocks(idx C) { return (C + 15) / 16; }

// g_f (B, C, 4) over H W, laid out (B, 4, C) for the channel loops
std::vector<float> scale_grad_rows(const torch::Tensor& g_f, idx hw) {
  const auto t = float_contiguous(g_f);
  const idx B = t.size(0), C = t.size(1);
  const float* p = t.data_ptr<float>();
  const float d = static_cast<float>(hw);
  std::vector<float> rows(static_cast<size_t>(B * kScaleKernels * C));
  for (idx b = 0; b < B; ++b)
    for (idx c = 0; c < C; ++c)
      for (int j = 0; j < kScaleKernels; ++j)
        rows[(b * kScaleKernels + j) * C + c] = p[(b * C + c) * kScaleKernels + j] / d;
  return rows;
}

// ------------------------------------------------------------------------------------------------ row kernels
// out = relu(e + pix[x]), mask = relu bit, mean[x] = mean_c out
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

// acc[c] += sum_x relu(s[x, c]); mask |= bit where s > 0
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

// backward of the noise tail for one row: g_x = g m (direct term), g_mu, its channel sums, and acc[c] += g_m z.
// Everything is always written (callers pass scratch rows for what they do not need): no branches in the loop.
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

// g_e = relu mask * (g_r1 + g_mr[x] / C), gsum[x] = sum_c g_e
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

// dst[x, c] = bit set ? gf[c] : 0
void expand_row(const int32_t* __restrict mask, const float* __restrict gf, int32_t bit, float* __restrict dst, idx W,
                idx C) {
  for (idx xx = 0; xx < W; ++xx) {
    const idx o = xx * C;
#pragma omp simd simdlen(16)
    for (idx c = 0; c < C; ++c) dst[o + c] = (mask[o + c] & bit) ? gf[c] : 0.f;
  }
}

// out += pix[x] * scale (broadcast over channels)
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

// ------------------------------------------------------------------------------------------------ AVX-512 rows
// Hand-vectorised forms of the stencil-heavy rows, used when the CPU has AVX-512 (F, BW, VL, DQ) and selected at
// run time (`set_isa`), so one build serves every x86 CPU. Each 16-channel block is one register: the five stencils
// of sweep 1 share their nine tap loads (the generic rows reload every tap per kernel), channel tails and image
// edges are masked loads (a masked-off lane reads nothing and gives 0), and the scale path's backward reads the
// mask bytes directly instead of four expanded gradient maps. Same maths as the generic rows; sums are ordered
// differently, so results agree to rounding.
#if WB_HAS_AVX512_PATH
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

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

// The three columns x - 1, x, x + 1 a 3x3 stencil reads at pixel x, and their lane masks: an off-image column gets
// mask 0 (its masked load reads nothing and gives zeros) and a valid address.
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

struct TapColumns {
  idx x[3];
  __mmask16 mask[3];
};
WB_AVX512 inline TapColumns tap_columns(idx x, idx W, __mmask16 lm) {
  const bool left = x > 0, right = x + 1 < W;
  return {{left ? x - 1 : x, x, right ? x + 1 : x},
          {left ? lm : static_cast<__mmask16>(0), lm, right ? lm : static_cast<__mmask16>(0)}};
}

// One output row of sweep 1: r1 = relu(E1(h)) (E1 = K_id stencil + pix[x], pix = the K_all stencil of the channel
// mean), the mask bytes, mr[x] = mean_c r1 and, when training, fsum[j, c] = sum_x relu(K_j * h).
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

// The scale path's mask bits of one row as horizontal patterns, for table lookups in the backward: word (x, c) holds
// bit j of the mask bytes at x - 1, x and x + 1 (zero off the image) in its bits 3 j, 3 j + 1 and 3 j + 2. A
// permute reads the low four bits of each index, so (word >> 3 j) picks a row's share of kernel j's transposed
// stencil from a 16-entry table (entries 8-15 repeat 0-7 for the next kernel's bit above): one permute instead of
// three bit tests and three masked adds.
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

// out = sum_{dy, dx} K[3 dy + dx] * rows[dy][x + dx - 1, c] (a null row is zero padding): one stencil row
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

// fast_exp, fast_log1p_unit, softplus and the sigmoid above, sixteen lanes at a time (same polynomials)
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
// two-register permutes and five FMAs in place of an exp and a log1p (about twenty multiplies): the forward sweep of
// a 128x28x28x64 map took 0.25 ms less.
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

// noise_tail_row over one image row: a = mu + pix[x] + eps, m = 1 + k (s softplus(a) - 1),
// out = max(min(h m, clip), lo) (lo = -inf, or 0 where the layer's ReLU is fused into the site).
// mult: the multiplier row, or nullptr not to write it; mstats: (sum m, sum m^2) += this row's, or nullptr.
WB_AVX512 void noise_tail_row_avx512(const float* __restrict h, const float* __restrict mu,
                                     const float* __restrict pix, const float* __restrict eps,
                                     const float* __restrict scale, float* __restrict out, float* __restrict mult,
                                     float* __restrict a_out, float k, float cl, float lo, idx W, idx C,
                                     double* mstats = nullptr) {
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

// noise_tail_backward_row over one image row (see there); acc[c] += sum_x g_m z. mult: the forward's multiplier
// row, or nullptr to recompute it from a (the same expression as the forward, so the same values). lo: the
// forward's lower bound (-inf, or 0 for a fused ReLU, which passes the gradient where h m > 0).
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

// ---- the fused site (frozen phi): a pre-pass over h, then E1 -> E2 -> noise tail in one sweep with r1 in a ring

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

// Pre-pass row: mh[x] = mean_c h (the centre row); when training also fsum[j, c] = sum_x relu(K_j * h) and the mask
// bytes' bits 0-3 (K_j * h > 0).
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

// r1 = relu(E1(h)) for one row (E1 = K_id stencil + pix[x]) and mr[x] = mean_c r1; relu_bits: nullptr, or the row's
// ReLU bits (E1 > 0), one 16-bit word a pixel and 16-channel block (the compare's own mask, stored as it is).
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

// BatchNorm's per-channel sums over one NHWC row, 64 channels at a time in registers, pixels in order (the row is
// read once, front to back): the batch moments' s1 = sum (a - k), s2 = sum (a - k)^2 (kGradient false, b unused), or
// the backward's s1 = sum a, s2 = sum a (b - k) (a: the gradient row, b: the input row, k: the batch mean).
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

// g_E1 for one row: ge = [E1 > 0] (g_r1 + g_mr[x] / C) and its channel sums gsum[x] (relu_bits: the row's words
// from e1_row_avx512)
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

// Row y of a pooled site's backward from the pooled gradient (g_pool, code, m, d: that row's pooled row yp = y / 2,
// unread when y is the unpooled last row of an odd height): g_x = g m and g_mu = g d at each window's winner, zero
// elsewhere (and in the unpooled last column of an odd width); g_mu_sum[x] = sum_c g_mu.
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
#else
bool cpu_has_avx512() { return false; }
#endif

// Which row kernels the sweeps use: the AVX-512 ones where the CPU has them, unless switched off (tests run both).
std::atomic<bool>& use_avx512() {
  static std::atomic<bool> flag{WB_HAS_AVX512_PATH && cpu_has_avx512()};
  return flag;
}

// (B, H, 4, C) per-row relu sums -> (B, C, 4) spatial means, summed over rows in double (size independent)
// Image b's scale features f[b, c, j] = acc[j C + c] * inv (acc: its relu sums over the map, in double)
inline void store_image_features(const std::vector<double>& acc, idx b, idx C, double inv, float* __restrict f) {
  for (int j = 0; j < kScaleKernels; ++j)
    for (idx c = 0; c < C; ++c) f[(b * C + c) * kScaleKernels + j] = static_cast<float>(acc[j * C + c] * inv);
}

torch::Tensor features_from_row_sums(const torch::Tensor& fpart, idx B, idx H, idx W, idx C) {
  auto f = torch::empty({B, C, kScaleKernels});
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
// r1 = relu(E1(h)), mr = mean_c r1, f[b,c,j] = mean_xy relu(K_j * h) (training), plus what the backward needs:
// mh = mean_c h and one mask byte per element (bits 0-3: K_j * h > 0, bit 4: E1 > 0).
std::vector<torch::Tensor> sweep1_forward(torch::Tensor x, torch::Tensor kid, torch::Tensor kall,
                                          torch::Tensor kscale, bool training) {
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  const auto Kid = kernel9(kid), Kall = kernel9(kall);
  const auto Ks = training ? kernel9(kscale) : std::vector<float>();
  auto opts = x.options();
  auto r1 = empty_map(x.sizes());
  auto mh = torch::empty({g.B, g.H, g.W}, opts);
  auto mr = torch::empty({g.B, g.H, g.W}, opts);
  auto mask = empty_map({g.B, g.H, g.W, g.C}, torch::kUInt8);
  auto fpart = training ? torch::empty({rows_total, kScaleKernels, g.C}, opts) : torch::empty({0}, opts);
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
  torch::Tensor f;
  if (training) {
    f = features_from_row_sums(fpart, g.B, g.H, g.W, g.C);
  } else {
    f = torch::empty({0}, opts);
  }
  return {r1, mr, f, mh, mask};
}

// grad wrt h of sweep 1 given g_r1 (NHWC), g_mr (B,H,W), g_f (B,C,4) or empty; plus kernel gradients when asked.
std::vector<torch::Tensor> sweep1_backward(torch::Tensor x, torch::Tensor mh, torch::Tensor mask, torch::Tensor g_r1,
                                           torch::Tensor g_mr, torch::Tensor g_f, torch::Tensor kid,
                                           torch::Tensor kall, torch::Tensor kscale, bool need_x, bool need_k1,
                                           bool need_ks, torch::Tensor gx_init) {
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
  auto gx = accumulate ? gx_init : need_x ? empty_channels_last(g.B, g.C, g.H, g.W) : torch::empty({0}, opts);
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
  auto sums = torch::zeros({n_acc}, torch::dtype(torch::kDouble));
  if (need_k1 || need_ks) {
    double* sp = sums.data_ptr<double>();
    for (idx r = 0; r < rows_total; ++r)
      for (int t = 0; t < n_acc; ++t) sp[t] += kacc[r * n_acc + t];
  }
  auto sf = sums.to(torch::kFloat);
  return {gx, sf.slice(0, 0, 9).view({1, 1, 3, 3}).clone(), sf.slice(0, 9, 18).view({1, 1, 3, 3}).clone(),
          sf.slice(0, 18, n_acc).view({kScaleKernels, 1, 3, 3}).clone()};
}

// ================================================================================================== sweep 2
// mu = E2(r1) (with mr = mean_c r1), a = mu + eps, z = softplus(a), m = 1 + k (s z - 1), out = min(h m, clip).
// eps: an NHWC tensor, or empty to draw it in-kernel from `seed`. Returns out, m, a.
std::vector<torch::Tensor> sweep2_forward(torch::Tensor x, torch::Tensor r1, torch::Tensor mr, torch::Tensor scale,
                                          torch::Tensor kid, torch::Tensor kall, torch::Tensor eps, int64_t seed,
                                          double noise_coeff, bool has_clip, double clip) {
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
  const float k = static_cast<float>(noise_coeff), cl = static_cast<float>(clip);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const bool avx512 = use_avx512();
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    std::vector<float> mu(rw), pix(g.W), noise(drawn ? rw : 0), scratch;
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
        draw_normals(noise.data(), r * rw, rw, useed, scratch, avx512);
        e = noise.data();
      } else {
        e = epsp + r * rw;
      }
      const idx o = r * rw;
#if WB_HAS_AVX512_PATH
      if (avx512) {
        noise_tail_row_avx512(xp + o, mu.data(), pix.data(), e, sp, op + o, mp + o, ap + o, k,
                              has_clip ? cl : std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity(), g.W, g.C);
        continue;
      }
#endif
      noise_tail_row(xp + o, mu.data(), pix.data(), e, sp, op + o, mp + o, ap + o, k, has_clip, cl, g.W, g.C);
    }
  });
  return {out, mult, a};
}

// Returns g_x (direct term), g_r1, g_mr, g_scale, g_Kid2, g_Kall2 (the last three empty when not asked).
std::vector<torch::Tensor> sweep2_backward(torch::Tensor x, torch::Tensor r1, torch::Tensor mr, torch::Tensor a,
                                           torch::Tensor mult, torch::Tensor scale, torch::Tensor g_out,
                                           torch::Tensor kid, torch::Tensor kall, double noise_coeff, bool has_clip,
                                           double clip, bool need_x, bool need_r1, bool need_scale, bool need_k) {
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
  const float k = static_cast<float>(noise_coeff), cl = static_cast<float>(clip);
  const bool need_mu = need_r1 || need_k;
  const bool avx512 = use_avx512();

  auto gx = need_x ? empty_channels_last(g.B, g.C, g.H, g.W) : torch::empty({0}, opts);  // see sweep1_backward
  auto gr1 = need_r1 ? empty_map(x.sizes()) : torch::empty({0}, opts);
  auto gmr = need_r1 ? torch::empty({g.B, g.H, g.W}, opts) : torch::empty({0}, opts);
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
                                       gs.data() + slot * g.W, acc.data(), k,
                                       has_clip ? cl : std::numeric_limits<float>::infinity(),
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
  torch::Tensor gscale = torch::empty({0}, opts), gkid = torch::empty({0}, opts), gkall = torch::empty({0}, opts);
  if (need_scale) {
    auto t = torch::zeros({g.C}, torch::dtype(torch::kDouble));
    double* tp = t.data_ptr<double>();
    for (idx r = 0; r < rows_total; ++r)
      for (idx c = 0; c < g.C; ++c) tp[c] += spart[r * g.C + c];
    gscale = t.to(torch::kFloat);
  }
  if (need_k) {
    auto t = torch::zeros({18}, torch::dtype(torch::kDouble));
    double* tp = t.data_ptr<double>();
    for (idx r = 0; r < rows_total; ++r)
      for (int i = 0; i < 18; ++i) tp[i] += kacc[r * 18 + i];
    auto tf = t.to(torch::kFloat);
    gkid = tf.slice(0, 0, 9).view({1, 1, 3, 3}).clone();
    gkall = tf.slice(0, 9, 18).view({1, 1, 3, 3}).clone();
  }
  return {gx, gr1, gmr, gscale, gkid, gkall};
}

// standalone draw (for tests of the generator): NHWC-linear normals
// A 63-bit seed from torch's default CPU generator (the stream torch.manual_seed sets), without the tensor and the
// dispatch of a torch.randint: each site draws one a call.
int64_t draw_seed() {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  return static_cast<int64_t>(at::check_generator<at::CPUGeneratorImpl>(generator)->random64() >> 1);
}

torch::Tensor draw(int64_t n, int64_t seed) {
  auto out = torch::empty({n}, torch::dtype(torch::kFloat));
  float* p = out.data_ptr<float>();
  const idx chunk = 4096;
  const bool avx512 = use_avx512();
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](idx c0, idx c1) {
    std::vector<float> scratch;
    for (idx c = c0; c < c1; ++c) {
      const idx start = c * chunk, len = std::min(chunk, n - start);
      draw_normals(p + start, start, len, static_cast<uint64_t>(seed), scratch, avx512);
    }
  });
  return out;
}

// ================================================================================================== fused site
// For a frozen phi on AVX-512 CPUs: the site in two passes over h forward and two backward, with r1, g_mu and g_E1
// only ever in three-row rings, and the multiplier never written (its mean and std are returned instead).
// Per site that is about 40% less memory traffic than the two sweeps, which matters because maps of a few MB and up
// are bound by memory bandwidth here, not by arithmetic.
// Built only where the AVX-512 rows are (x86-64); perturb() dispatches here only when isa() is "avx512".
#if WB_HAS_AVX512_PATH

// mh = mean_c h (B, H, W); training: f (B, C, 4) and the mask's bits 0-3 (K_j * h > 0). The mask map is allocated
// here when a training pass's backward will need it (keep), empty otherwise.
// A, B: the affine form of a BatchNorm in front of the site (h = A x + B per channel), or nullptr (h = x).
std::vector<torch::Tensor> scale_prepass(torch::Tensor x, torch::Tensor kscale, bool training, bool keep,
                                         const float* A = nullptr, const float* B = nullptr) {
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  const auto Ks = kernel9(kscale);
  auto opts = x.options();
  auto mh = empty_map({g.B, g.H, g.W});
  // the scale bits, for the backward of a training pass (evaluation has no scale path)
  auto mask = keep && training ? empty_map({g.B, g.H, g.W, g.C}, torch::kUInt8) : torch::empty({0}, torch::kUInt8);
  const float* xp = x.data_ptr<float>();
  float* mhp = mh.data_ptr<float>();
  uint8_t* mp = keep && training ? mask.data_ptr<uint8_t>() : nullptr;
  if (!training) {
    at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
      AffineRows h(xp, g, A, B);
      for (idx r = r0; r < r1_; ++r) {
        const float* hrows[3];
        h.neighbours(r / g.H, r % g.H, hrows);
        prepass_row_avx512<false>(hrows, nullptr, g.W, g.C, mhp + r * g.W, nullptr, nullptr);
      }
    });
    return {mh, torch::empty({0}, opts), mask};
  }
  // whole images a thread: each sums its rows' relu sums as it goes (in double, rows in order, as
  // features_from_row_sums does), with no (B H, 4, C) map of row sums and no second pass over one
  auto f = torch::empty({g.B, g.C, kScaleKernels}, opts);
  float* fp = f.data_ptr<float>();
  const double inv = 1.0 / static_cast<double>(g.H * g.W);
  at::parallel_for(0, g.B, 1, [&](idx b0, idx b1) {
    std::vector<float> fsum(static_cast<size_t>(kScaleKernels * g.C));
    std::vector<double> acc(fsum.size());
    AffineRows h(xp, g, A, B);
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

// out = min(h (1 + k (s softplus(E2(relu(E1(h))) + eps) - 1)), clip) in one sweep, then max(., 0) with relu (the
// layer's ReLU fused in) and the 2x2 max-pool (stride 2) with pool (the layer's pool fused in); with keep, also
// writes what the backward reads: bit 4 of the mask and a = mu + eps or, with pool, PooledKeep's maps (without
// keep, those are empty and the mask untouched). Returns out ((B, C, H, W) or pooled (B, C, H / 2, W / 2),
// channels_last), a (NHWC), the multiplier's [mean, std] (unbiased, like torch.std), and with pool the winners
// (NHWC bytes of the pooled shape) and the winners' m, d and p (NHWC floats of the pooled shape).
std::vector<torch::Tensor> fused_forward(torch::Tensor x, torch::Tensor mh, torch::Tensor scale,
                                         torch::Tensor kid1, torch::Tensor kall1, torch::Tensor kid2,
                                         torch::Tensor kall2, torch::Tensor eps, int64_t seed, double noise_coeff,
                                         bool has_clip, double clip, bool training, bool keep, bool relu, bool pool,
                                         const float* A = nullptr, const float* B = nullptr) {
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  const idx Hp = g.H / 2, Wp = g.W / 2;
  TORCH_CHECK(!pool || (Hp > 0 && Wp > 0), "a fused 2x2 pool needs a map of at least 2x2, got ", g.H, "x", g.W);
  const auto K1 = kernel9(kid1), Ka1 = kernel9(kall1), K2 = kernel9(kid2), Ka2 = kernel9(kall2);
  auto s = float_contiguous(scale);
  const float* sp = s.data_ptr<float>();
  const bool drawn = eps.numel() == 0;
  const float* epsp = drawn ? nullptr : eps.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* mhp = mh.data_ptr<float>();
  // the E1 ReLU bits for the backward: a 16-bit word a pixel and 16-channel block
  const idx blocks = relu_bit_blocks(g.C), bits_row = g.W * blocks;
  auto relu_bits = keep ? empty_map({g.B, g.H, g.W, blocks}, torch::kInt16) : torch::empty({0}, torch::kInt16);
  uint16_t* bitsp = keep ? reinterpret_cast<uint16_t*>(relu_bits.data_ptr<int16_t>()) : nullptr;
  auto out = pool ? empty_channels_last(g.B, g.C, Hp, Wp) : empty_channels_last(g.B, g.C, g.H, g.W);
  const bool keep_a = keep && !pool, keep_pooled = keep && pool;
  auto a = keep_a ? empty_map(x.sizes()) : torch::empty({0}, x.options());
  auto pooled_map = [&](at::ScalarType type) {
    return keep_pooled ? empty_map({g.B, Hp, Wp, g.C}, type) : torch::empty({0}, torch::TensorOptions(type));
  };
  auto winners = pooled_map(torch::kUInt8), win_m = pooled_map(torch::kFloat), win_d = pooled_map(torch::kFloat),
       win_p = pooled_map(torch::kFloat);
  float* op = out.data_ptr<float>();
  float* ap = keep_a ? a.data_ptr<float>() : nullptr;
  std::vector<double> rowstats(static_cast<size_t>(2 * rows_total), 0.0);
  const float k = static_cast<float>(noise_coeff);
  const float inf = std::numeric_limits<float>::infinity();
  const float cl = has_clip ? static_cast<float>(clip) : inf;
  const float lo = relu ? 0.0f : -inf;
  const uint64_t useed = static_cast<uint64_t>(seed);
  // with pool the rows are split between threads at row pairs, so that one thread makes both rows of a window
  const idx pairs = (g.H + 1) / 2, units = pool ? g.B * pairs : rows_total;
  auto first_row = [&](idx unit) { return pool ? unit / pairs * g.H + 2 * (unit % pairs) : unit; };
  at::parallel_for(0, units, 1, [&](idx u0, idx u1) {
    const idx r0 = first_row(u0), r1_ = first_row(u1);
    std::vector<float> ring(3 * rw), ring_mr(3 * g.W), mu(rw), pix(g.W), noise(drawn ? rw : 0), scratch,
        a_rows(keep_a ? 0 : 2 * rw), v_rows(pool ? 2 * rw : 0);
    RowRing r1_rows;
    AffineRows h(xp, g, A, B);
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
        draw_normals(noise.data(), r * rw, rw, useed, scratch, true);
        e = noise.data();
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
  auto stats = torch::tensor({static_cast<float>(mean), static_cast<float>(std::sqrt(var))});
  return {out, a, stats, relu_bits, winners, win_m, win_d, win_p};
}

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

// g_s (C) of a pooled site: sum over the pooled map of g_pool p (p from fused_forward); the scale path's gradient
// needs it before the backward sweep, which can then add that path in the same pass.
torch::Tensor pooled_scale_grad(torch::Tensor g_pool, torch::Tensor win_p) {
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
  auto out = torch::empty({C});
  for (idx c = 0; c < C; ++c) out.data_ptr<float>()[c] = static_cast<float>(total[c]);
  return out;
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

// The input gradient of fused_forward (without pool) except the scale path (scale_backward adds that), and g_scale
// when asked; relu as in the forward.
std::vector<torch::Tensor> fused_backward(torch::Tensor x, torch::Tensor a, torch::Tensor relu_bits,
                                          torch::Tensor scale, torch::Tensor g_out, torch::Tensor kid1,
                                          torch::Tensor kall1, torch::Tensor kid2, torch::Tensor kall2,
                                          double noise_coeff, bool has_clip,
                                          double clip, bool need_scale, bool relu, const float* A = nullptr,
                                          const float* B = nullptr) {
  const Geometry g = geometry(x);
  const idx rows_total = g.B * g.H, rw = g.row();
  float K1f[9], Ka1f[9], K2f[9], Ka2f[9];
  flip9(kernel9(kid1).data(), K1f);
  flip9(kernel9(kall1).data(), Ka1f);
  flip9(kernel9(kid2).data(), K2f);
  flip9(kernel9(kall2).data(), Ka2f);
  auto s = float_contiguous(scale);
  const float* sp = s.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* gp = g_out.data_ptr<float>();
  const uint16_t* bitsp = reinterpret_cast<const uint16_t*>(relu_bits.data_ptr<int16_t>());
  auto gx = empty_channels_last(g.B, g.C, g.H, g.W);  // a tensor of its own: see sweep1_backward
  float* gxp = gx.data_ptr<float>();
  std::vector<double> spart(need_scale ? static_cast<size_t>(rows_total * g.C) : 0, 0.0);
  const float k = static_cast<float>(noise_coeff);
  const float cl = has_clip ? static_cast<float>(clip) : std::numeric_limits<float>::infinity();
  const float lo = relu ? 0.0f : -std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    std::vector<float> acc(g.C);
    AffineRows h(xp, g, A, B);  // h = x, or the rows of a fused BatchNorm's output
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
  torch::Tensor gscale = torch::empty({0}, x.options());
  if (need_scale) {
    auto t = torch::zeros({g.C}, torch::dtype(torch::kDouble));
    double* tp = t.data_ptr<double>();
    for (idx r = 0; r < rows_total; ++r)
      for (idx c = 0; c < g.C; ++c) tp[c] += spart[r * g.C + c];
    gscale = t.to(torch::kFloat);
  }
  return {gx, gscale};
}

// The whole input gradient of a pooled fused site (fused_forward with pool), the scale path included when g_f (B, C,
// 4, from site_scale_backward) is given: one sweep with g_mu and g_E1 in three-row rings like fused_backward, but the
// noise path's start comes from the winners' kept m and d (unpool_row_avx512) and each output row adds the scale
// path's masked stencils in the same loop as the E1 terms.
// With a fused BatchNorm (bn_input: its NHWC input, bn_mean: its batch mean), also BatchNorm's two sums over each
// channel of gx, sum gx and sum gx (x - mean), into bn_sums (2 C doubles): each gx row's as it is written (in float,
// kept per row), then in double over rows and images in order, so they do not depend on the thread count.
torch::Tensor fused_backward_pooled(torch::Tensor mask, torch::Tensor relu_bits, torch::Tensor g_pool,
                                    torch::Tensor winners, torch::Tensor win_m, torch::Tensor win_d, torch::Tensor g_f,
                                    torch::Tensor kid1, torch::Tensor kall1, torch::Tensor kid2, torch::Tensor kall2,
                                    torch::Tensor kscale, const float* bn_input = nullptr,
                                    const float* bn_mean = nullptr, double* bn_sums = nullptr) {
  const Geometry g{relu_bits.size(0), relu_bits.size(1), relu_bits.size(2), g_pool.size(3)};
  const idx rows_total = g.B * g.H, rw = g.row(), Hp = g.H / 2, Wp = g.W / 2;
  float K1f[9], Ka1f[9], K2f[9], Ka2f[9];
  flip9(kernel9(kid1).data(), K1f);
  flip9(kernel9(kall1).data(), Ka1f);
  flip9(kernel9(kid2).data(), K2f);
  flip9(kernel9(kall2).data(), Ka2f);
  std::vector<float> Ksf(9 * kScaleKernels);
  const auto ks = kernel9(kscale);
  for (int j = 0; j < kScaleKernels; ++j) flip9(ks.data() + 9 * j, Ksf.data() + 9 * j);
  const bool scale_path = g_f.numel() > 0;
  const auto gf = scale_path ? scale_grad_rows(g_f, g.H * g.W) : std::vector<float>();
  const float* gfp = scale_path ? gf.data() : nullptr;
  const float* gp = g_pool.data_ptr<float>();
  const uint8_t* wp = winners.data_ptr<uint8_t>();
  const float* mwp = win_m.data_ptr<float>();
  const float* dwp = win_d.data_ptr<float>();
  const uint8_t* maskp = scale_path ? mask.data_ptr<uint8_t>() : nullptr;  // the scale bits (training only)
  const uint16_t* bitsp = reinterpret_cast<const uint16_t*>(relu_bits.data_ptr<int16_t>());
  auto gx = empty_channels_last(g.B, g.C, g.H, g.W);
  float* gxp = gx.data_ptr<float>();
  std::vector<float> row_sums(bn_input ? static_cast<size_t>(rows_total * 2 * g.C) : 0);  // row r: 2C at r 2C
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
      if (!bn_input) return;
      if (r + 3 < r1_) prefetch_span(bn_input + (r + 3) * rw, rw * 4);
      float* sums = row_sums.data() + r * 2 * g.C;
      batch_norm_row_sums_avx512<true>(gxp + r * rw, bn_input + r * rw, bn_mean, g.W, g.C, sums, sums + g.C);
    });
  });
  if (bn_input) sum_rows_in_order(row_sums, g.B, g.H, 2 * g.C, bn_sums);
  return gx;
}

// The per-channel scale of a site from its scale features f (B, C, 4): s_c = sigmoid(w . [m_c, v_c, channel_ratio,
// size_ratio]) with m, v the batch mean and unbiased variance of f (training; the running statistics are updated in
// place, the variance times B / (B - 1) once more with double_bessel, as the original) or the running statistics
// (evaluation, f empty). Sums in double. Returns s (C) and m (C, 4) (for the backward).
std::vector<torch::Tensor> site_scale_forward(torch::Tensor f, torch::Tensor running_mean, torch::Tensor running_var,
                                              torch::Tensor fc_weight, double channel_ratio, double size_ratio,
                                              double momentum, bool double_bessel) {
  const bool training = f.numel() > 0;
  const idx C = running_mean.size(0);
  auto w = kernel9(fc_weight);  // the ten weights, flattened
  auto m = torch::empty({C, kScaleKernels}), v = torch::empty({C, kScaleKernels});
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
    const double correction = double_bessel ? static_cast<double>(B) / static_cast<double>(B - 1) : 1.0;
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
  auto s = torch::empty({C});
  float* sp = s.data_ptr<float>();
  for (idx c = 0; c < C; ++c) {
    double pre = w[8] * channel_ratio + w[9] * size_ratio;
    for (int j = 0; j < kScaleKernels; ++j)
      pre += static_cast<double>(w[j]) * mp[c * kScaleKernels + j] +
             static_cast<double>(w[kScaleKernels + j]) * vp[c * kScaleKernels + j];
    sp[c] = static_cast<float>(1.0 / (1.0 + std::exp(-pre)));
  }
  return {s, m};
}

// g_f (B, C, 4) from g_s (C): the backward of site_scale_forward in training mode (phi frozen: no weight gradient).
torch::Tensor site_scale_backward(torch::Tensor f, torch::Tensor m, torch::Tensor s, torch::Tensor fc_weight,
                                  torch::Tensor g_s) {
  auto fc = f.contiguous();
  const idx B = fc.size(0), C = fc.size(1);
  auto w = kernel9(fc_weight);
  auto gsc = float_contiguous(g_s);
  const float* fp = fc.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* gp = gsc.data_ptr<float>();
  auto g_f = torch::empty({B, C, kScaleKernels});
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

// gx += sum_j g_f[b, c, j] / (H W) * (K_j^T * [mask bit j]): the scale path's share of the input gradient, in place.
// With a fused BatchNorm, also its backward sums into bn_sums, from each finished gx row (as fused_backward_pooled).
torch::Tensor scale_backward(torch::Tensor mask, torch::Tensor g_f, torch::Tensor kscale, torch::Tensor gx,
                             const float* bn_input = nullptr, const float* bn_mean = nullptr,
                             double* bn_sums = nullptr) {
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
  std::vector<float> row_sums(bn_input ? static_cast<size_t>(rows_total * 2 * C) : 0);
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    PatternRing patterns(rw);
    for (idx r = r0; r < r1_; ++r) {
      const idx b = r / H, y = r % H;
      const uint32_t* prows[3];
      patterns.window(maskp, g, b, y, prows);
      sweep1_backward_row_avx512(gxp + r * rw, gxp + r * rw, nullptr, prows, nullptr, nullptr, Ksf.data(),
                                 gfp + b * kScaleKernels * C, W, C);
      if (bn_input) {
        if (r + 3 < r1_) prefetch_span(bn_input + (r + 3) * rw, rw * 4);
        float* sums = row_sums.data() + r * 2 * C;
        batch_norm_row_sums_avx512<true>(gxp + r * rw, bn_input + r * rw, bn_mean, W, C, sums, sums + C);
      }
    }
  });
  if (bn_input) sum_rows_in_order(row_sums, g.B, g.H, 2 * g.C, bn_sums);
  return gx;
}

// A training BatchNorm's batch statistics of an NHWC map: each channel's mean and biased variance, in one pass. Sums
// of x - x[0, c] (the shift keeps the variance exact when the mean is large against the spread): a row in float, an
// image's rows in order in double, then the images in order, so the numbers do not depend on the thread count.
std::pair<std::vector<double>, std::vector<double>> batch_moments(const torch::Tensor& x) {
  const Geometry g = geometry(x);
  const idx rw = g.row(), C = g.C;
  const float* xp = x.data_ptr<float>();
  std::vector<float> shift(xp, xp + C);
  std::vector<double> per_image(static_cast<size_t>(g.B * 2 * C), 0.0);  // image b: sums at b 2C, squares after
  at::parallel_for(0, g.B, 1, [&](idx b0, idx b1) {
    std::vector<float> s1(C), s2(C);
    for (idx b = b0; b < b1; ++b) {
      double* acc = per_image.data() + b * 2 * C;
      for (idx r = b * g.H; r < (b + 1) * g.H; ++r) {
        batch_norm_row_sums_avx512<false>(xp + r * rw, nullptr, shift.data(), g.W, C, s1.data(), s2.data());
        for (idx c = 0; c < C; ++c) {
          acc[c] += s1[c];
          acc[C + c] += s2[c];
        }
      }
    }
  });
  std::vector<double> sum(C, 0.0), squares(C, 0.0);
  for (idx b = 0; b < g.B; ++b)
    for (idx c = 0; c < C; ++c) {
      sum[c] += per_image[b * 2 * C + c];
      squares[c] += per_image[b * 2 * C + C + c];
    }
  const double n = static_cast<double>(g.B * g.H * g.W);
  std::vector<double> mean(C), var(C);
  for (idx c = 0; c < C; ++c) {
    const double m = sum[c] / n;
    mean[c] = shift[c] + m;
    var[c] = std::max(0.0, squares[c] / n - m * m);
  }
  return {mean, var};
}

// BatchNorm's backward (training) from the gradient of its output g, in place: g = A g + P x + Q per channel with
// A = weight invstd, P = -A invstd S / n, Q = -A sum_g / n - P mean, where sums holds sum_g = sum g and sum g (x -
// mean) (S = that times invstd: the weight's gradient; sum_g is the bias's). x: the NHWC input. Returns the weight's
// and the bias's gradients.
std::pair<torch::Tensor, torch::Tensor> batch_norm_backward_in_place(torch::Tensor& g, const torch::Tensor& x,
                                                                     const torch::Tensor& mean,
                                                                     const torch::Tensor& invstd,
                                                                     const torch::Tensor& weight,
                                                                     const std::vector<double>& sums) {
  const idx C = x.size(3), rw = x.size(2) * C, rows_total = x.size(0) * x.size(1);
  const double n = static_cast<double>(x.numel() / C);
  auto g_weight = torch::empty({C}), g_bias = torch::empty({C});
  std::vector<float> A(C), P(C), Q(C);
  for (idx c = 0; c < C; ++c) {
    const double is = invstd.data_ptr<float>()[c], m = mean.data_ptr<float>()[c];
    const double a = is * (weight.numel() ? weight.data_ptr<float>()[c] : 1.0f);
    const double s = sums[C + c] * is, p = -a * is * s / n;
    A[c] = static_cast<float>(a);
    P[c] = static_cast<float>(p);
    Q[c] = static_cast<float>(-a * sums[c] / n - p * m);
    g_weight.data_ptr<float>()[c] = static_cast<float>(s);
    g_bias.data_ptr<float>()[c] = static_cast<float>(sums[c]);
  }
  float* gp = g.data_ptr<float>();  // channels_last memory: NHWC
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, rows_total, 1, [&](idx r0, idx r1_) {
    const float* __restrict a = A.data();
    const float* __restrict pp = P.data();
    const float* __restrict q = Q.data();
    for (idx r = r0; r < r1_; ++r) {
      float* __restrict grow = gp + r * rw;
      const float* __restrict xrow = xp + r * rw;
      for (idx o = 0; o < rw; o += C)
#pragma omp simd
        for (idx c = 0; c < C; ++c) grow[o + c] = a[c] * grow[o + c] + pp[c] * xrow[o + c] + q[c];
    }
  });
  return {g_weight, g_bias};
}

// The whole fused site for a frozen phi as one C++ autograd node: h -> (out, scale, [mean, std] of the multiplier).
// The forward is scale_prepass, site_scale_forward and fused_forward; the backward fused_backward(_pooled) with the
// scale statistics' backward (and scale_backward without pool). A Python autograd.Function around the same kernels
// cost about a millisecond of every Conv-4 training step in Python glue and the engine's calls into Python.
// Differentiable once: a backward asked to build a graph stops with an error (the eager path is twice-differentiable).
// batch_norm: h is a training BatchNorm2d's output and the node takes its input instead (bn_weight and bn_bias may be
// empty, bn_running_* empty when it keeps none): its batch statistics come from one pass over that input, h's rows
// are made from it as the sweeps read them (never written), its running statistics are updated with factor
// bn_momentum, and the backward takes BatchNorm's two sums from the gradient of h as its last sweep writes it and
// then applies BatchNorm's backward in place (one pass).
struct FusedSiteFunction : public torch::autograd::Function<FusedSiteFunction> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, torch::Tensor h, torch::Tensor kid1, torch::Tensor kall1,
      torch::Tensor kid2, torch::Tensor kall2, torch::Tensor kscale, torch::Tensor fc_weight,
      torch::Tensor running_mean, torch::Tensor running_var, torch::Tensor eps, int64_t seed, double noise_coeff,
      bool has_clip, double clip, bool training, double channel_ratio, double size_ratio, double momentum,
      bool double_bessel, bool keep, bool relu, bool pool, bool batch_norm, torch::Tensor bn_weight,
      torch::Tensor bn_bias, torch::Tensor bn_running_mean, torch::Tensor bn_running_var, double bn_eps,
      double bn_momentum) {
    const auto x = h.detach().permute({0, 2, 3, 1}).contiguous();  // NHWC: no copy for a channels_last map
    TORCH_CHECK(!batch_norm || training, "a BatchNorm is fused into a site of a training pass only");
    std::vector<float> affine;  // A (C) then B (C): h = A x + B
    torch::Tensor bn_mean, bn_invstd;
    if (batch_norm) {
      const idx C = x.size(3);
      const idx n = x.numel() / C;
      TORCH_CHECK(n > 1, "BatchNorm in training mode needs more than 1 value per channel, got input of shape ",
                  h.sizes());
      const auto [mean, var] = batch_moments(x);
      bn_mean = torch::empty({C});
      bn_invstd = torch::empty({C});
      affine.resize(2 * C);
      const auto w = bn_weight.numel() ? float_contiguous(bn_weight) : bn_weight;
      const auto bias = bn_bias.numel() ? float_contiguous(bn_bias) : bn_bias;
      for (idx c = 0; c < C; ++c) {
        const double invstd = 1.0 / std::sqrt(var[c] + bn_eps);
        const double a = invstd * (w.numel() ? w.data_ptr<float>()[c] : 1.0f);
        affine[c] = static_cast<float>(a);
        affine[C + c] = static_cast<float>((bias.numel() ? bias.data_ptr<float>()[c] : 0.0f) - mean[c] * a);
        bn_mean.data_ptr<float>()[c] = static_cast<float>(mean[c]);
        bn_invstd.data_ptr<float>()[c] = static_cast<float>(invstd);
      }
      if (bn_running_mean.numel()) {
        auto rm = bn_running_mean.accessor<float, 1>();
        auto rv = bn_running_var.accessor<float, 1>();
        const double unbiased = static_cast<double>(n) / static_cast<double>(n - 1);
        for (idx c = 0; c < C; ++c) {
          rm[c] = static_cast<float>((1.0 - bn_momentum) * rm[c] + bn_momentum * mean[c]);
          rv[c] = static_cast<float>((1.0 - bn_momentum) * rv[c] + bn_momentum * var[c] * unbiased);
        }
      }
    }
    const float* A = batch_norm ? affine.data() : nullptr;
    const float* B = batch_norm ? affine.data() + x.size(3) : nullptr;
    auto pre = scale_prepass(x, kscale, training, keep, A, B);      // mh, features, mask
    auto sc = site_scale_forward(pre[1], running_mean, running_var, fc_weight, channel_ratio, size_ratio, momentum,
                                 double_bessel);                    // scale, mean
    const auto e = eps.numel() == 0 ? eps : eps.detach().to(torch::kFloat).permute({0, 2, 3, 1}).contiguous();
    auto fw = fused_forward(x, pre[0], sc[0], kid1, kall1, kid2, kall2, e, seed, noise_coeff, has_clip, clip,
                            training, keep, relu, pool, A, B);      // out, a, stats, relu_bits, winners, m, d, p
    ctx->saved_data["noise_coeff"] = noise_coeff;
    ctx->saved_data["has_clip"] = has_clip;
    ctx->saved_data["clip"] = clip;
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["pool"] = pool;
    ctx->saved_data["batch_norm"] = batch_norm;
    ctx->saved_data["bn_eps"] = bn_eps;
    ctx->saved_data["shape"] = std::vector<int64_t>(x.sizes().begin(), x.sizes().end());
    // with pool the backward reads the windows' winners and what they keep (pooled maps) instead of h and a
    std::vector<torch::Tensor> saved = pool ? std::vector<torch::Tensor>{fw[4], fw[5], fw[6], fw[7]}
                                            : std::vector<torch::Tensor>{x, fw[1], torch::Tensor(), torch::Tensor()};
    for (const auto& t : {pre[2], fw[3], sc[0], pre[1], sc[1], kid1, kall1, kid2, kall2, kscale, fc_weight})
      saved.push_back(t);
    if (batch_norm)  // BatchNorm's backward reads its input (NHWC: a copy when h was not channels_last), statistics
      // and, without pool (the backward reads h there), its affine form
      for (const auto& t : {x, bn_mean, bn_invstd, bn_weight, torch::tensor(affine)}) saved.push_back(t);
    ctx->save_for_backward(saved);
    if (training)
      ctx->mark_non_differentiable({fw[2]});
    else
      ctx->mark_non_differentiable({fw[2], sc[0]});
    return {fw[0], sc[0], fw[2]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::GradMode::is_enabled(),
                "the fused perturbation site is differentiable once; for higher-order gradients set the site's "
                "fused = False (the eager path)");
    torch::autograd::variable_list out(29);
    const bool batch_norm = ctx->saved_data["batch_norm"].toBool();
    // needs_input_grad counts the tensor inputs only (bn_weight is the 11th); `out` has a slot for every input
    const bool need_bn_weight = batch_norm && ctx->needs_input_grad(10), need_bn_bias = batch_norm && ctx->needs_input_grad(11);
    if (!ctx->needs_input_grad(0) && !need_bn_weight && !need_bn_bias) return out;
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &mask = saved[4], &relu_bits = saved[5], &scale = saved[6], &features = saved[7],
                        &mean = saved[8], &kid1 = saved[9], &kall1 = saved[10], &kid2 = saved[11],
                        &kall2 = saved[12], &kscale = saved[13], &fc_weight = saved[14];
    TORCH_CHECK(relu_bits.numel() > 0, "the fused perturbation site's forward kept nothing for a backward (it ran "
                "without keep: no input needed a gradient when it ran)");
    const bool training = ctx->saved_data["training"].toBool();
    const auto shape = ctx->saved_data["shape"].toIntVector();  // B, H, W, C
    const torch::Tensor& g_out = grads[0];
    const torch::Tensor& g_scale_out = grads[1];
    if (ctx->saved_data["pool"].toBool()) {
      const auto g_pool = g_out.defined() ? g_out.permute({0, 2, 3, 1}).contiguous()
                                          : torch::zeros({shape[0], shape[1] / 2, shape[2] / 2, shape[3]});
      torch::Tensor g_features = torch::empty({0});
      if (training) {
        auto g_scale = pooled_scale_grad(g_pool, saved[3]);
        if (g_scale_out.defined()) g_scale = g_scale + g_scale_out;
        g_features = site_scale_backward(features, mean, scale, fc_weight, g_scale);
      }
      if (!batch_norm) {
        out[0] = fused_backward_pooled(mask, relu_bits, g_pool, saved[0], saved[1], saved[2], g_features, kid1,
                                       kall1, kid2, kall2, kscale);
        return out;
      }
      // the gradient of h, with BatchNorm's two sums taken as it is written; then through BatchNorm in place
      const auto& x = saved[15];  // NHWC
      const idx C = shape[3];
      std::vector<double> sums(2 * C, 0.0);
      auto gx = fused_backward_pooled(mask, relu_bits, g_pool, saved[0], saved[1], saved[2], g_features, kid1, kall1,
                                      kid2, kall2, kscale, x.data_ptr<float>(), saved[16].data_ptr<float>(),
                                      sums.data());
      auto g_bn = batch_norm_backward_in_place(gx, x, saved[16], saved[17], saved[18], sums);
      out[0] = gx;
      if (need_bn_weight) out[23] = g_bn.first;
      if (need_bn_bias) out[24] = g_bn.second;
      return out;
    }
    const torch::Tensor &x = saved[0], &a = saved[1];  // x: h, or a fused BatchNorm's input
    const float* A = batch_norm ? saved[19].data_ptr<float>() : nullptr;  // h = A x + B
    const float* B = batch_norm ? A + shape[3] : nullptr;
    torch::Tensor gx, g_scale;
    if (g_out.defined()) {
      auto r = fused_backward(x, a, relu_bits, scale, g_out.permute({0, 2, 3, 1}).contiguous(), kid1, kall1, kid2,
                              kall2, ctx->saved_data["noise_coeff"].toDouble(), ctx->saved_data["has_clip"].toBool(),
                              ctx->saved_data["clip"].toDouble(), training, ctx->saved_data["relu"].toBool(), A, B);
      gx = r[0];
      g_scale = r[1];
    } else {  // a loss on the scale alone
      gx = empty_channels_last(shape[0], shape[3], shape[1], shape[2]).zero_();
      g_scale = torch::zeros({shape[3]});
    }
    std::vector<double> sums(batch_norm ? 2 * shape[3] : 0, 0.0);
    if (training) {
      if (g_scale_out.defined()) g_scale = g_scale + g_scale_out;
      auto g_features = site_scale_backward(features, mean, scale, fc_weight, g_scale);
      // adds the scale path in place (the last sweep: with BatchNorm, it takes BatchNorm's sums too)
      scale_backward(mask, g_features, kscale, gx, batch_norm ? x.data_ptr<float>() : nullptr,
                     batch_norm ? saved[16].data_ptr<float>() : nullptr, batch_norm ? sums.data() : nullptr);
    }
    if (batch_norm) {
      auto g_bn = batch_norm_backward_in_place(gx, x, saved[16], saved[17], saved[18], sums);
      if (need_bn_weight) out[23] = g_bn.first;
      if (need_bn_bias) out[24] = g_bn.second;
    }
    out[0] = gx;
    return out;
  }
};

std::vector<torch::Tensor> fused_site(torch::Tensor h, torch::Tensor kid1, torch::Tensor kall1, torch::Tensor kid2,
                                      torch::Tensor kall2, torch::Tensor kscale, torch::Tensor fc_weight,
                                      torch::Tensor running_mean, torch::Tensor running_var, torch::Tensor eps,
                                      int64_t seed, double noise_coeff, bool has_clip, double clip, bool training,
                                      double channel_ratio, double size_ratio, double momentum, bool double_bessel,
                                      bool keep, bool relu, bool pool, bool batch_norm, torch::Tensor bn_weight,
                                      torch::Tensor bn_bias, torch::Tensor bn_running_mean,
                                      torch::Tensor bn_running_var, double bn_eps, double bn_momentum) {
  return FusedSiteFunction::apply(h, kid1, kall1, kid2, kall2, kscale, fc_weight, running_mean, running_var, eps, seed,
                                  noise_coeff, has_clip, clip, training, channel_ratio, size_ratio, momentum,
                                  double_bessel, keep, relu, pool, batch_norm, bn_weight, bn_bias, bn_running_mean,
                                  bn_running_var, bn_eps, bn_momentum);
}
#endif  // WB_HAS_AVX512_PATH

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused MetaPerturb perturbation-site kernels (NHWC float32, CPU)";
  m.def("sweep1_forward", &sweep1_forward);
  m.def("sweep1_backward", &sweep1_backward);
  m.def("sweep2_forward", &sweep2_forward);
  m.def("sweep2_backward", &sweep2_backward);
  m.def("draw", &draw);
  m.def("draw_seed", &draw_seed, "a 63-bit seed from the default CPU generator");
#if WB_HAS_AVX512_PATH
  m.def("fused_site", &fused_site, "the whole fused site as one autograd node: (out, scale, multiplier [mean, std])");
#endif
  m.def("isa", [] { return std::string(use_avx512() ? "avx512" : "generic"); }, "the row kernels in use");
  m.def("cpu_has_avx512", [] { return static_cast<bool>(WB_HAS_AVX512_PATH && cpu_has_avx512()); });
  m.def("set_isa", [](const std::string& isa) {
    TORCH_CHECK(isa == "generic" || isa == "avx512", "isa must be 'generic' or 'avx512', not '", isa, "'");
    TORCH_CHECK(isa == "generic" || (WB_HAS_AVX512_PATH && cpu_has_avx512()), "this CPU has no AVX-512 (F, BW, VL, DQ)");
    use_avx512() = isa == "avx512";
  }, "choose the row kernels: 'avx512' (where the CPU has it) or 'generic'");
  m.def("pool_release", [] { return map_pool().release(); }, "free the recycled map buffers; returns the bytes freed");
  m.def("pool_held", [] { return map_pool().held(); }, "bytes of recycled map buffers held for reuse");
}
