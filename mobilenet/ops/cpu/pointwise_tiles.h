// The pointwise (1x1) inference forward's register tiles, shared by the
// pointwise kernel (pointwise_cpu.cc) and the depthwise kernel that feeds its
// output rows straight into the next product (depthwise_cpu.cc).
//
// y = act((x * gate[image]) @ w * scale + bias) + residual, where gate (one
// value per image and input channel: squeeze-and-excitation's) and residual
// are optional. Register tiles of 6 rows x the widest run of output channels
// the registers hold (4 vectors of 16 on AVX-512, 2 of 8 on AVX2), the input
// channels in L1-sized chunks, the epilogue applied as the last chunk's tile
// is stored. The sum over input channels runs in order, in float32.

#ifndef MOBILENET_POINTWISE_TILES_H_
#define MOBILENET_POINTWISE_TILES_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_vectors.h"

namespace mobilenet {
namespace pointwise {

// The forward's activations on any vector type: clip(z, lo, hi) (ReLU, ReLU6,
// none) or hard-swish, as cpu_vectors.h's ActivationKind names them.
struct ClipAct {
  float lo, hi;
  template <typename V>
  V operator()(V z) const {
    const V zero = {};
    z = z > zero + lo ? z : zero + lo;
    return z < zero + hi ? z : zero + hi;
  }
};

struct HardSwishAct {  // z * relu6(z + 3) / 6, as jax.nn.hard_swish.
  template <typename V>
  V operator()(V z) const {
    return z * ClipAct{0.0f, 6.0f}(z + 3.0f) * (1.0f / 6.0f);
  }
};

struct IdentityAct {  // A linear epilogue: a raw product, or a projection's BatchNorm.
  template <typename V>
  V operator()(V z) const {
    return z;
  }
};

struct Epilogue {
  const float* scale;
  const float* bias;
};

constexpr int kForwardTileRows = 6;         // Rows per register tile.
constexpr int64_t kForwardBlockRows = 96;   // Rows per block: their chunk of x stays in L1/L2.
constexpr int64_t kForwardChunk = 256;      // Input channels per pass over a block.

// kR rows of y (`y` and `residual` at the tile's first row, column 0; x at
// its first row), output channels d0 .. d0 + kW * wide + kH * 8, from input
// channels k0 .. k0 + kc: started from y (k0 > 0) or zero, the epilogue
// applied when `last`. kH adds one 8-lane vector to the tile, so that 24, 40
// or 56 channels take one pass over x, whose loads every vector shares.
template <int kR, int kW, int kH, typename Act>
void ForwardTile(const float* x, int64_t c, const float* w, int64_t d, int64_t d0, int64_t k0,
                 int64_t kc, bool last, const Epilogue& e, Act act, const float* residual,
                 float* y) {
  constexpr int64_t wide = LanesOf<Wide>();
  Wide acc[kR][kW > 0 ? kW : 1];
  Vec8 half[kR];
  for (int r = 0; r < kR; ++r) {
    const float* prior = y + r * d + d0;
    for (int v = 0; v < kW; ++v) acc[r][v] = k0 == 0 ? Wide{} : LoadVector<Wide>(prior + v * wide);
    if constexpr (kH) half[r] = k0 == 0 ? Vec8{} : mobilenet::Load(prior + kW * wide);
  }
  const float* xk = x + k0;
  const float* wk = w + k0 * d + d0;
  for (int64_t k = 0; k < kc; ++k) {
    Wide b[kW > 0 ? kW : 1];
    for (int v = 0; v < kW; ++v) b[v] = LoadVector<Wide>(wk + k * d + v * wide);
    Vec8 bh;
    if constexpr (kH) bh = mobilenet::Load(wk + k * d + kW * wide);
    for (int r = 0; r < kR; ++r) {
      const float a = xk[r * c + k];
      for (int v = 0; v < kW; ++v) acc[r][v] += a * b[v];
      if constexpr (kH) half[r] += a * bh;
    }
  }
  // The epilogue, on the vector z of row r's outputs from column d0 + at.
  auto finish = [&](auto z, int r, int64_t at) {
    using V = decltype(z);
    const int64_t offset = r * d + d0 + at;
    if (last) {
      z = act(z * LoadVector<V>(e.scale + d0 + at) + LoadVector<V>(e.bias + d0 + at));
      if (residual) z += LoadVector<V>(residual + offset);
    }
    StoreVector(y + offset, z);
  };
  for (int r = 0; r < kR; ++r) {
    for (int v = 0; v < kW; ++v) finish(acc[r][v], r, v * wide);
    if constexpr (kH) finish(half[r], r, kW * wide);
  }
}

// `rows` rows of one tile's width, kForwardTileRows at a time, then one at a
// time (only where a thread's share of rows ends).
template <int kW, int kH, typename Act>
void ForwardColumns(int64_t rows, const float* x, int64_t c, const float* w, int64_t d, int64_t d0,
                    int64_t k0, int64_t kc, bool last, const Epilogue& e, Act act,
                    const float* residual, float* y) {
  int64_t r = 0;
  auto tile = [&](auto tile_rows) {
    constexpr int kR = decltype(tile_rows)::value;
    ForwardTile<kR, kW, kH>(x + r * c, c, w, d, d0, k0, kc, last, e, act,
                            residual ? residual + r * d : nullptr, y + r * d);
    r += kR;
  };
  while (r + kForwardTileRows <= rows) tile(std::integral_constant<int, kForwardTileRows>{});
  while (r < rows) tile(std::integral_constant<int, 1>{});
}

// Rows [lo, hi) of y. `gate` is (images, c) with `per_image` rows each, or
// nullptr: a block's rows are then multiplied by their gates first, into a
// buffer the tiles read (once per row, where the tiles would multiply once
// per row and tile).
template <typename Act>
void ForwardRows(const float* x, const float* gate, int64_t per_image, const float* w,
                 const Epilogue& e, Act act, const float* residual, int64_t lo, int64_t hi,
                 int64_t c, int64_t d, float* y) {
  constexpr int64_t wide = LanesOf<Wide>();
  constexpr int64_t panel = kWideTileVectors * wide;
  const int64_t rest = d % panel;  // Output channels after the full panels: one narrower tile.
  std::vector<float> gated(gate ? kForwardBlockRows * c : 0);
  for (int64_t b0 = lo; b0 < hi; b0 += kForwardBlockRows) {
    const int64_t rows = std::min(hi - b0, kForwardBlockRows);
    const float* xb = x + b0 * c;
    if (gate) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* in = xb + r * c;
        const float* g = gate + (b0 + r) / per_image * c;
        float* out = gated.data() + r * c;
        for (int64_t k = 0; k < c; ++k) out[k] = in[k] * g[k];
      }
      xb = gated.data();
    }
    const float* rb = residual ? residual + b0 * d : nullptr;
    float* yb = y + b0 * d;
    for (int64_t k0 = 0; k0 < c; k0 += kForwardChunk) {
      const int64_t kc = std::min(kForwardChunk, c - k0);
      const bool last = k0 + kc == c;
      auto columns = [&](auto shape, int64_t d0) {
        constexpr int kW = decltype(shape)::first_type::value;
        constexpr int kH = decltype(shape)::second_type::value;
        ForwardColumns<kW, kH>(rows, xb, c, w, d, d0, k0, kc, last, e, act, rb, yb);
      };
      for (int64_t d0 = 0; d0 + panel <= d; d0 += panel) {
        columns(TileShape<kWideTileVectors, 0>{}, d0);
      }
      WithTile(static_cast<int>(rest / wide), rest % wide != 0,
               [&](auto shape) { columns(shape, d - rest); });
    }
  }
}

}  // namespace pointwise
}  // namespace mobilenet

#endif  // MOBILENET_POINTWISE_TILES_H_
