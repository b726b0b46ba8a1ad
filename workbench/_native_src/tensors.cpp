// Map buffers, tensor helpers and the draws (declared in tensors.h).
#include "tensors.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "noise.h"

namespace wb {
namespace {

// Buffers for the kernel's maps, recycled. A fresh map of some megabytes costs the kernel a page fault and a zeroed
// page per 4 KiB on first touch, about as much time as the sweep that fills it (docs/results.md, "Kernel figures
// from the code comments"), and glibc gives large blocks back to the system on free. A training step asks for the
// same sizes every time, so freed maps go to a free list keyed by byte size (at most kPoolBytes held, the rest is
// freed) and the next request reuses one.
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

}  // namespace

at::Tensor empty_map(at::IntArrayRef sizes, at::ScalarType dtype) {
  idx numel = 1;
  for (auto v : sizes) numel *= v;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (bytes < MapPool::kMinBytes) return at::empty(sizes, at::dtype(dtype));
  const size_t rounded = MapPool::block_bytes(bytes);
  void* p = map_pool().take(rounded);
  TORCH_CHECK(p != nullptr, "native perturb: out of memory allocating ", rounded, " bytes");
  return at::from_blob(p, sizes, [rounded](void* q) { map_pool().give(q, rounded); }, at::dtype(dtype));
}

at::Tensor empty_channels_last(idx B, idx C, idx H, idx W) {
  auto nhwc = empty_map({B, H, W, C});
  auto storage = nhwc.storage();
  return at::empty({0}, nhwc.options()).set_(storage, 0, {B, C, H, W}, {H * W * C, 1, W * C, C});
}

Geometry geometry(const at::Tensor& x_nhwc) {
  TORCH_CHECK(x_nhwc.dim() == 4 && x_nhwc.scalar_type() == at::kFloat && x_nhwc.is_contiguous(),
              "native perturb expects a contiguous float32 NHWC tensor");
  return {x_nhwc.size(0), x_nhwc.size(1), x_nhwc.size(2), x_nhwc.size(3)};
}

at::Tensor float_contiguous(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.detach().to(at::kFloat).contiguous();
}

std::vector<float> kernel9(const at::Tensor& k) {
  auto c = float_contiguous(k);
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

int64_t pool_release() { return map_pool().release(); }

int64_t pool_held() { return map_pool().held(); }

std::vector<float> scale_grad_rows(const at::Tensor& g_f, idx hw) {
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

int64_t draw_seed() {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  return static_cast<int64_t>(at::check_generator<at::CPUGeneratorImpl>(generator)->random64() >> 1);
}

at::Tensor draw(int64_t n, int64_t seed) {
  auto out = at::empty({n}, at::dtype(at::kFloat));
  draw_normals_parallel(out.data_ptr<float>(), n, static_cast<uint64_t>(seed), use_avx512());
  return out;
}

at::Tensor sum_row_partials(const std::vector<double>& partials, idx rows, idx C) {
  auto t = at::zeros({C}, at::dtype(at::kDouble));
  double* tp = t.data_ptr<double>();
  for (idx r = 0; r < rows; ++r)
    for (idx c = 0; c < C; ++c) tp[c] += partials[r * C + c];
  return t.to(at::kFloat);
}

}  // namespace wb
