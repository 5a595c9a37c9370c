// The stem's dense convolution for XLA:CPU (few input channels, e.g. RGB),
// called through jax.ffi.
//
// As patches @ kernel, XLA writes a (N, H, W, kh*kw*C) copy of the image
// (27 values per pixel for RGB) before the product: at batch 128, 32x32, the
// copy and its 9 padded slices took 6-11 ms of a 25 ms eval step at alpha
// 0.25. These loops read each input pixel where it lies instead. The forward
// pass reads a zero-padded copy of one image at a time and computes register
// tiles of a few pixels x up to 64 output channels (the widest vectors the
// CPU has), the filter gradient register tiles of patch positions x output
// channels, from the same padded copy. The output channel count must be a
// multiple of 8 (convolution.py checks). Layouts: x NHWC, w (kh, kw, C, O),
// y NHWC, float32; strides and low padding as attributes.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "convolution_tiles.h"
#include "cpu_loops.h"
#include "cpu_vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobilenet::kLanes;
using mobilenet::kWideTileVectors;
using mobilenet::LanesOf;
using mobilenet::Load;
using mobilenet::LoadVector;
using mobilenet::Store;
using mobilenet::StoreVector;
using mobilenet::Vec8;
using mobilenet::Wide;

using mobilenet::convolution::Geometry;
using mobilenet::convolution::PaddedImage;

void Forward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* w, float* y) {
  const PaddedImage image(g);
  mobilenet::ParallelFor(pool, g.n, mobilenet::NumChunks(pool, g.n),
                         [&](int64_t, int64_t lo, int64_t hi) {
    std::vector<float> padded(image.rows * image.cols * g.c, 0.0f);
    for (int64_t n = lo; n < hi; ++n) {
      image.Fill(g, x, n, padded.data());
      for (int64_t i = 0; i < g.oh; ++i) {
        mobilenet::convolution::ForwardRow(g, image, padded.data(), w, i,
                                           y + (n * g.oh + i) * g.ow * g.o);
      }
    }
  });
}

// Filter-gradient entries (patch positions, w's order) k0 .. k0 + kTaps x
// output channels [d0, d0 + kW wide + kH 8-lane vectors), summed over output
// row i's pixels in a register tile (one gradient load feeds kTaps
// multiply-adds, one broadcast input value kW + kH of them), then added to
// `out` (the image's (kh*kw*C, O) gradient). A row at a time, so that its
// gradient and input rows stay in L1 across the tiles that read them.
template <int kTaps, int kW, int kH>
void FilterGradTile(const Geometry& g, const PaddedImage& image, const float* padded,
                    const float* dy, int64_t i, int64_t k0, int64_t d0, float* out) {
  constexpr int64_t wide = LanesOf<Wide>();
  Wide acc[kTaps][kW > 0 ? kW : 1] = {};
  Vec8 half[kTaps] = {};
  int64_t offsets[kTaps];
  for (int t = 0; t < kTaps; ++t) offsets[t] = image.offsets[k0 + t];
  const int64_t step = g.sw * g.c;
  const float* corner = padded + i * g.sh * image.cols * g.c;
  const float* grad = dy + i * g.ow * g.o + d0;
  for (int64_t j = 0; j < g.ow; ++j, corner += step, grad += g.o) {
    Wide d[kW > 0 ? kW : 1];
    for (int v = 0; v < kW; ++v) d[v] = mobilenet::KeepInRegister(LoadVector<Wide>(grad + v * wide));
    Vec8 d_half;
    if constexpr (kH) d_half = mobilenet::KeepInRegister(Load(grad + kW * wide));
    for (int t = 0; t < kTaps; ++t) {
      const float value = corner[offsets[t]];
      for (int v = 0; v < kW; ++v) acc[t][v] += value * d[v];
      if constexpr (kH) half[t] += value * d_half;
    }
  }
  for (int t = 0; t < kTaps; ++t) {
    float* row = out + (k0 + t) * g.o + d0;
    for (int v = 0; v < kW; ++v) {
      StoreVector(row + v * wide, LoadVector<Wide>(row + v * wide) + acc[t][v]);
    }
    if constexpr (kH) Store(row + kW * wide, Load(row + kW * wide) + half[t]);
  }
}

// All patch positions for one run of output channels: tiles of 9 positions
// (a 3x3 RGB patch is 27) where the run is one or two vectors wide, else 3
// (about 9-18 accumulators), and single positions for what is left.
template <int kW, int kH>
void FilterGradColumns(const Geometry& g, const PaddedImage& image, const float* padded,
                       const float* dy, int64_t i, int64_t d0, float* out) {
  constexpr int kTaps = kW + kH <= 2 ? 9 : 3;
  const int64_t taps = image.offsets.size();
  int64_t k0 = 0;
  for (; k0 + kTaps <= taps; k0 += kTaps) {
    FilterGradTile<kTaps, kW, kH>(g, image, padded, dy, i, k0, d0, out);
  }
  for (; k0 < taps; ++k0) FilterGradTile<1, kW, kH>(g, image, padded, dy, i, k0, d0, out);
}

// dw[a,b,c,o] = sum_{n,i,j} x[n, i*sh+a-pt, j*sw+b-pl, c] * dy[n,i,j,o]:
// float32 per image (from its zero-padded copy, as the forward pass reads
// it), double across images.
void FilterGrad(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* dy,
                float* dw) {
  constexpr int64_t panel = kWideTileVectors * LanesOf<Wide>();
  const PaddedImage image(g);
  const int64_t size = g.kh * g.kw * g.c * g.o;
  const int64_t rest = g.o % panel;
  const int64_t chunks = mobilenet::NumChunks(pool, g.n);
  std::vector<double> totals(chunks * size, 0.0);
  mobilenet::ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t lo, int64_t hi) {
    std::vector<float> padded(image.rows * image.cols * g.c, 0.0f);
    std::vector<float> per_image(size);
    double* total = totals.data() + chunk * size;
    for (int64_t n = lo; n < hi; ++n) {
      image.Fill(g, x, n, padded.data());
      std::fill(per_image.begin(), per_image.end(), 0.0f);
      const float* grad = dy + n * g.oh * g.ow * g.o;
      for (int64_t i = 0; i < g.oh; ++i) {
        for (int64_t d0 = 0; d0 + panel <= g.o; d0 += panel) {
          FilterGradColumns<kWideTileVectors, 0>(g, image, padded.data(), grad, i, d0,
                                                 per_image.data());
        }
        mobilenet::WithTile(static_cast<int>(rest / LanesOf<Wide>()), rest % LanesOf<Wide>() != 0,
                            [&](auto shape) {
          constexpr int kW = decltype(shape)::first_type::value;
          constexpr int kH = decltype(shape)::second_type::value;
          FilterGradColumns<kW, kH>(g, image, padded.data(), grad, i, g.o - rest, per_image.data());
        });
      }
      for (int64_t k = 0; k < size; ++k) total[k] += per_image[k];
    }
  });
  mobilenet::SumChunks(totals, chunks, size, dw);
}

// x: (N, H, W, C); w: (kh, kw, C, O); y: (N, OH, OW, O).
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  return Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, pt, pl};
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pl) {
  Geometry g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pl);
  if (g.o % kLanes != 0) return ffi::Error::InvalidArgument("output channels must be a multiple of 8");
  Forward(pool, g, x.typed_data(), w.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error FilterGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                          int64_t pl) {
  Geometry g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pl);
  if (g.o % kLanes != 0) return ffi::Error::InvalidArgument("output channels must be a multiple of 8");
  FilterGrad(pool, g, x.typed_data(), dy.typed_data(), dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// Both kernels: two float32 operands, one float32 result, strides and low padding.
#define CONVOLUTION_BINDING                                                       \
  ffi::Ffi::Bind()                                                                \
      .Ctx<ffi::ThreadPool>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                               \
      .Arg<ffi::Buffer<ffi::F32>>()                                               \
      .Ret<ffi::Buffer<ffi::F32>>()                                               \
      .Attr<int64_t>("sh")                                                        \
      .Attr<int64_t>("sw")                                                        \
      .Attr<int64_t>("pt")                                                        \
      .Attr<int64_t>("pl")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvolutionForward, ForwardImpl, CONVOLUTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvolutionFilterGrad, FilterGradImpl, CONVOLUTION_BINDING);
