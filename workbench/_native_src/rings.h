// Row rings and row views: how the sweeps hold the rows they compute once and read from three output rows, and how
// they read the rows of an NHWC map (or of a BatchNorm's output made from its input as they go).
#pragma once

#include <vector>

#include "common.h"

namespace wb {

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

// rows y-1, y, y+1 of image b in an NHWC buffer with `width` floats per row (nullptr outside the image)
inline void neighbours(const float* base, const Geometry& g, idx b, idx y, idx width, const float* rows[3]) {
  for (int dy = 0; dy < 3; ++dy) {
    const idx yy = y + dy - 1;
    rows[dy] = (yy < 0 || yy >= g.H) ? nullptr : base + (b * g.H + yy) * width;
  }
}

#if WB_HAS_AVX512_PATH
// Ask for the lines of [p, p + bytes) ahead of use (into L2). The fused forward walks each row of h once per
// 16-channel block, a strided pattern the hardware prefetchers follow too late: on maps that spill the caches it
// waited on those loads (docs/results.md, "Kernel figures from the code comments").
inline void prefetch_span(const void* p, idx bytes, bool for_writing = false) {
  const char* c = static_cast<const char*>(p);
  if (for_writing)
    for (idx off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_ET0);
  else
    for (idx off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
}
#endif

// h = A x + B per channel: a BatchNorm fused in front of the site, in its affine form (A and B: C floats each).
// A null: no BatchNorm, h = x.
struct AffineForm {
  const float* A = nullptr;
  const float* B = nullptr;
};

// The rows of h = A x + B (AffineForm) made from the rows of x when a sweep first asks for them and held in four
// slots (row i in slot i % 4; the fused forward at row r reads rows r - 1 .. r + 2, the pre-pass r - 1 .. r + 1), so
// h itself is never written. Without A it hands out x's rows.
class AffineRows {
 public:
  AffineRows(const float* x, const Geometry& g, AffineForm affine)
      : x_(x), A_(affine.A), B_(affine.B), W_(g.W), C_(g.C), H_(g.H), ring_(affine.A ? 4 * g.row() : 0) {}

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

}  // namespace wb
