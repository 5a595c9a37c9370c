// Float32 vectors for the C++ kernels' inner loops: eight lanes (Vec8), and the
// widest this CPU has (Wide) for register tiles.
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
#include <type_traits>
#include <utility>

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

// The widest vector this CPU has, and how many of them a register tile's row
// of output channels holds (the kernels' full tiles).
#if defined(__AVX512F__)
typedef float Wide __attribute__((vector_size(64)));
constexpr int kWideTileVectors = 4;
#else
typedef Vec8 Wide;
constexpr int kWideTileVectors = 2;
#endif

template <typename V>
constexpr int64_t LanesOf() { return sizeof(V) / sizeof(float); }

template <typename V>
V LoadVector(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
void StoreVector(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

// A register tile's run of output channels: W Wide vectors and H (0 or 1)
// 8-lane ones, so that 24, 40 or 56 channels take one pass over the input.
template <int W, int H>
using TileShape = std::pair<std::integral_constant<int, W>, std::integral_constant<int, H>>;

// Calls body(TileShape<wide, half>{}) for the last, narrower run of output
// channels after the full tiles (nothing for 0 x 0).
template <typename Body>
void WithTile(int wide, int half, Body body) {
  switch (wide * 2 + half) {
    case 1: return body(TileShape<0, 1>{});
    case 2: return body(TileShape<1, 0>{});
#if defined(__AVX512F__)
    case 3: return body(TileShape<1, 1>{});
    case 4: return body(TileShape<2, 0>{});
    case 5: return body(TileShape<2, 1>{});
    case 6: return body(TileShape<3, 0>{});
    case 7: return body(TileShape<3, 1>{});
#endif
    default: return;
  }
}

// `v`, which the compiler must then hold in a register. For a register tile's
// shared operand: left to itself, GCC folds its load into each of the tile's
// multiply-adds (a load per multiply-add instead of one per tile step), and on
// CPUs that load 512 bits at half the rate of 256 (Zen 4) those loads, not the
// multiply-adds, bound the loop.
template <typename V>
inline V KeepInRegister(V v) {
#if defined(__x86_64__)
  asm("" : "+v"(v));  // An empty instruction that "changes" v in a vector register.
#endif
  return v;
}

}  // namespace mobilenet

#endif  // MOBILENET_CPU_VECTORS_H_
