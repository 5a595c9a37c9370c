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
// over memory. The register tiles are in pointwise_tiles.h; here the rows are
// split between threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_loops.h"
#include "cpu_vectors.h"
#include "pointwise_tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobilenet::kLanes;
using mobilenet::Vec8;
using mobilenet::pointwise::ClipAct;
using mobilenet::pointwise::Epilogue;
using mobilenet::pointwise::ForwardRows;
using mobilenet::pointwise::HardSwishAct;
using mobilenet::pointwise::kForwardTileRows;
using mobilenet::kWideTileVectors;
using mobilenet::LanesOf;
using mobilenet::LoadVector;
using mobilenet::StoreVector;
using mobilenet::Wide;

constexpr int kTileRows = 6;  // Input channels per register tile.
constexpr int64_t kBlockBytes = 192 * 1024;  // x and dy rows per block, together.

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
