// Eight float32 lanes for the C++ kernels' inner loops.
//
// GCC's vector extension: one AVX register on this project's CPUs (two SSE
// registers elsewhere), written as plain arithmetic (`acc += x * taps`, a
// scalar times a vector broadcasts). Loops over a fixed number of lanes
// compile to straight-line vector code where loops over a runtime channel
// count would pay their overhead per pixel.

#ifndef MOBILENET_CPU_VECTORS_H_
#define MOBILENET_CPU_VECTORS_H_

#include <cstdint>
#include <cstring>

namespace mobilenet {

typedef float Vec8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

// Unaligned load and store (memcpy compiles to one vmovups).
inline Vec8 Load(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// The activation after a BatchNorm, as the kernels' `activation`, `in_kind` and
// `out_kind` attributes name it (ops/batch_norm.py's KERNEL_ACTIVATIONS):
// clip(z, lo, hi) (ReLU, ReLU6, none) or MobileNetV3's hard-swish.
enum ActivationKind : int32_t { kClip = 0, kHardSwish = 1 };

// min(max(v, lo), hi) lane by lane.
inline Vec8 Clip(Vec8 v, Vec8 lo, Vec8 hi) {
  v = v > lo ? v : lo;
  return v < hi ? v : hi;
}

}  // namespace mobilenet

#endif  // MOBILENET_CPU_VECTORS_H_
