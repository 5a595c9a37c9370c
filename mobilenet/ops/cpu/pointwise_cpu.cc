// The pointwise (1x1) convolution's products for XLA:CPU, via jax.ffi: the
// filter gradient (training) and the inference forward with its epilogue.
//
// Filter gradient. dw[c, d] = sum_p x[p, c] * dy[p, d] over all N*H*W positions p: a matrix
// product with a long inner dimension (up to 131,072 at batch 128, 32x32)
// and few outputs (8 x 16 upward). XLA:CPU runs it as a plain dot on a
// transposed copy of x, at 1-5 GMAC/s for MobileNet's early layers; removing
// it from the training step cut the step by 30% (alpha 0.25). Here: blocks of
// rows small enough for L2, and within a block register tiles of 6 input
// channels x the widest run of output channels the registers hold: 4 vectors
// of 16 on AVX-512 (24 of its 32 registers accumulate; one broadcast of x
// feeds four multiply-adds), 2 vectors of 8 on AVX2 (12 of 16); narrower
// tiles take the remaining output channels. Rows are split between threads,
// each with a float32 partial sum, added up in a fixed order (deterministic
// for a given thread count). Output channels must be a multiple of 8
// (pointwise.py checks).
//
// Inference forward (models/fused_inference.py).
// y = act((x * gate[image]) @ w * scale + bias) + residual, where gate (one
// value per image and input channel: squeeze-and-excitation's) and residual
// are optional. XLA:CPU computes these products (YNNPACK) at a third to half
// of this loop's rate for MobileNet's small ones (a few hundred rows, or 8-64
// channels), and the BatchNorm, gate and residual add as further passes
// over memory. Register tiles of 6 rows x the widest run of output channels
// the registers hold (as above), the input channels in L1-sized chunks, the
// epilogue applied as the last chunk's tile is stored; rows are split between
// threads. The sum over input channels runs in order, in float32.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_loops.h"
#include "cpu_vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobilenet::kLanes;
using mobilenet::Vec8;

// The widest vector this CPU has, and how many of them a tile row holds.
#if defined(__AVX512F__)
typedef float Wide __attribute__((vector_size(64)));
constexpr int kWideTileVectors = 4;
#else
typedef Vec8 Wide;
constexpr int kWideTileVectors = 2;
#endif

constexpr int kTileRows = 6;  // Input channels per register tile.
constexpr int64_t kBlockBytes = 192 * 1024;  // x and dy rows per block, together.

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

// dw[c0 .. c0 + kC, d0 .. d0 + kV * lanes) += x[rows, c0 ..]^T dy[rows, d0 ..].
template <typename V, int kC, int kV>
void Tile(const float* x, const float* dy, int64_t rows, int64_t c, int64_t d, int64_t c0,
          int64_t d0, float* dw) {
  constexpr int64_t lanes = LanesOf<V>();
  V acc[kC][kV];
  for (int i = 0; i < kC; ++i)
    for (int v = 0; v < kV; ++v) acc[i][v] = LoadVector<V>(dw + (c0 + i) * d + d0 + v * lanes);
  for (int64_t p = 0; p < rows; ++p) {
    const float* x_row = x + p * c + c0;
    V g[kV];
    for (int v = 0; v < kV; ++v) g[v] = LoadVector<V>(dy + p * d + d0 + v * lanes);
    for (int i = 0; i < kC; ++i) {
      float value = x_row[i];
      for (int v = 0; v < kV; ++v) acc[i][v] += value * g[v];
    }
  }
  for (int i = 0; i < kC; ++i)
    for (int v = 0; v < kV; ++v) StoreVector(dw + (c0 + i) * d + d0 + v * lanes, acc[i][v]);
}

template <typename V, int kV>
void TileRows(int rows_in_tile, const float* x, const float* dy, int64_t rows, int64_t c,
              int64_t d, int64_t c0, int64_t d0, float* dw) {
  switch (rows_in_tile) {
    case 6: return Tile<V, 6, kV>(x, dy, rows, c, d, c0, d0, dw);
    case 5: return Tile<V, 5, kV>(x, dy, rows, c, d, c0, d0, dw);
    case 4: return Tile<V, 4, kV>(x, dy, rows, c, d, c0, d0, dw);
    case 3: return Tile<V, 3, kV>(x, dy, rows, c, d, c0, d0, dw);
    case 2: return Tile<V, 2, kV>(x, dy, rows, c, d, c0, d0, dw);
    default: return Tile<V, 1, kV>(x, dy, rows, c, d, c0, d0, dw);
  }
}

// dw (c x d) += x[rows]^T dy[rows], one L2-sized block of rows at a time.
void AddProduct(const float* x, const float* dy, int64_t rows, int64_t c, int64_t d, float* dw) {
  const int64_t block = std::max<int64_t>(8, kBlockBytes / (4 * (c + d)));
  constexpr int64_t wide = LanesOf<Wide>();
  for (int64_t first = 0; first < rows; first += block) {
    const int64_t n = std::min(block, rows - first);
    const float* xb = x + first * c;
    const float* gb = dy + first * d;
    for (int64_t c0 = 0; c0 < c; c0 += kTileRows) {
      const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, c - c0));
      int64_t d0 = 0;
      for (; d0 + kWideTileVectors * wide <= d; d0 += kWideTileVectors * wide) {
        TileRows<Wide, kWideTileVectors>(tile_rows, xb, gb, n, c, d, c0, d0, dw);
      }
      for (; d0 + wide <= d; d0 += wide) TileRows<Wide, 1>(tile_rows, xb, gb, n, c, d, c0, d0, dw);
      for (; d0 < d; d0 += kLanes) TileRows<Vec8, 1>(tile_rows, xb, gb, n, c, d, c0, d0, dw);
    }
  }
}

ffi::Error FilterGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw) {
  const int64_t c = x.dimensions().back(), d = dy.dimensions().back();
  const int64_t rows = x.element_count() / c;
  if (d % kLanes != 0) return ffi::Error::InvalidArgument("output channels must be a multiple of 8");
  // A caller that declares a wrong output (e.g. per-example, without calls.py's `combine`) must
  // get an error, not a write past the buffer.
  if (dw->element_count() != c * d || dy.element_count() != rows * d) {
    return ffi::Error::InvalidArgument("dw must be (C, D) and dy (..., D) with x's positions");
  }
  const int64_t chunks = mobilenet::NumChunks(pool, rows);
  std::vector<float> partial(chunks * c * d, 0.0f);
  mobilenet::ParallelFor(pool, rows, chunks, [&](int64_t chunk, int64_t lo, int64_t hi) {
    AddProduct(x.typed_data() + lo * c, dy.typed_data() + lo * d, hi - lo, c, d,
               partial.data() + chunk * c * d);
  });
  float* out = dw->typed_data();
  std::copy(partial.begin(), partial.begin() + c * d, out);
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const float* part = partial.data() + chunk * c * d;
    for (int64_t k = 0; k < c * d; ++k) out[k] += part[k];
  }
  return ffi::Error::Success();
}

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

struct Epilogue {
  const float* scale;
  const float* bias;
};

template <int W, int H>
using TileShape = std::pair<std::integral_constant<int, W>, std::integral_constant<int, H>>;

// Calls body(TileShape<wide, half>{}) for a tile of `wide` Wide vectors and
// `half` (0 or 1) 8-lane ones, as ForwardRows' last, narrower tile needs
// (nothing for 0 x 0).
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

// x: (..., C); w: (C, D); scale, bias: (D); residual: (..., D) or empty; gate:
// (N, C) or empty, N dividing x's rows; y: (..., D).
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::F32> gate,
                       ffi::ResultBuffer<ffi::F32> y, int32_t kind, float lo, float hi) {
  const int64_t c = x.dimensions().back(), d = w.dimensions().back();
  const int64_t rows = x.element_count() / c;
  if (d % kLanes != 0) return ffi::Error::InvalidArgument("output channels must be a multiple of 8");
  if (w.element_count() != c * d || y->element_count() != rows * d ||
      scale.element_count() != d || bias.element_count() != d ||
      (residual.element_count() != 0 && residual.element_count() != rows * d)) {
    return ffi::Error::InvalidArgument("shapes: x (..., C), w (C, D), scale and bias (D), "
                                       "residual and y (..., D)");
  }
  if (kind != mobilenet::kClip && kind != mobilenet::kHardSwish) {
    return ffi::Error::InvalidArgument("unknown activation kind");
  }
  const bool gated = gate.element_count() > 0;
  const int64_t images = gated ? gate.element_count() / c : 1;
  if (gated && (images == 0 || rows % images != 0 || images * c != gate.element_count())) {
    return ffi::Error::InvalidArgument("the gate must be (images, input channels)");
  }
  const Epilogue e{scale.typed_data(), bias.typed_data()};
  const float* res = residual.element_count() > 0 ? residual.typed_data() : nullptr;
  const float* g = gated ? gate.typed_data() : nullptr;
  auto run = [&](auto act) {
    const int64_t chunks = mobilenet::NumChunks(pool, (rows + kForwardTileRows - 1) / kForwardTileRows);
    mobilenet::ParallelFor(pool, rows, chunks, [&](int64_t, int64_t first, int64_t end) {
      ForwardRows(x.typed_data(), g, rows / images, w.typed_data(), e, act, res, first, end, c, d,
                  y->typed_data());
    });
  };
  if (kind == mobilenet::kHardSwish) {
    run(HardSwishAct{});
  } else {
    run(ClipAct{lo, hi});
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PointwiseInferenceForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("activation")
                                  .Attr<float>("lo")
                                  .Attr<float>("hi"));

// x: (..., C) and dy: (..., D) float32 with the same leading dimensions; dw: (C, D).
XLA_FFI_DEFINE_HANDLER_SYMBOL(PointwiseFilterGrad, FilterGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
