// The stem's dense convolution for XLA:CPU (few input channels, e.g. RGB),
// called through jax.ffi.
//
// As patches @ kernel, XLA writes a (N, H, W, kh*kw*C) copy of the image
// (27 values per pixel for RGB) before the product: at batch 128, 32x32, the
// copy and its 9 padded slices took 6-11 ms of a 25 ms eval step at alpha
// 0.25. These loops read each input pixel where it lies instead. The forward
// pass reads a zero-padded copy of one image at a time and computes register
// tiles of a few pixels x up to 64 output channels (the widest vectors the
// CPU has); the filter gradient goes 8 output channels at a time
// (cpu_vectors.h), up to 32 per pass. The output channel count must be a
// multiple of 8 (convolution.py checks). Layouts: x NHWC, w (kh, kw, C, O),
// y NHWC, float32; strides and low padding as attributes.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_loops.h"
#include "cpu_vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobilenet::kLanes;
using mobilenet::Load;
using mobilenet::Store;
using mobilenet::Vec8;

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pl;
};

// The most output-channel vectors one pass accumulates.
constexpr int kMaxBlocks = 4;

// Calls tap(input_pixel, a * kw + b) for every filter tap (a, b) of output
// pixel (n, i, j) that lands inside the image (the border pixels' path).
template <typename Tap>
inline void ForTaps(const Geometry& g, const float* x, int64_t n, int64_t i, int64_t j, Tap tap) {
  for (int64_t a = 0; a < g.kh; ++a) {
    int64_t r = i * g.sh + a - g.pt;
    if (r < 0 || r >= g.h) continue;
    for (int64_t b = 0; b < g.kw; ++b) {
      int64_t q = j * g.sw + b - g.pl;
      if (q < 0 || q >= g.w) continue;
      tap(x + ((n * g.h + r) * g.w + q) * g.c, a * g.kw + b);
    }
  }
}

// Where an interior pixel's window lies: input (a, b, c) of the patch is at
// window[k] from its top-left corner, k = (a * kw + b) * C + c (w's order).
struct Window {
  std::vector<int64_t> offsets;
  int64_t first_row, last_row, first_col, last_col;  // Interior output rows and columns.

  explicit Window(const Geometry& g) {
    for (int64_t a = 0; a < g.kh; ++a)
      for (int64_t b = 0; b < g.kw; ++b)
        for (int64_t c = 0; c < g.c; ++c) offsets.push_back((a * g.w + b) * g.c + c);
    auto first = [](int64_t pad, int64_t stride) { return (pad + stride - 1) / stride; };
    auto last = [](int64_t size, int64_t k, int64_t pad, int64_t stride) {
      return size - k + pad >= 0 ? (size - k + pad) / stride + 1 : 0;
    };
    first_row = std::min(first(g.pt, g.sh), g.oh);
    last_row = std::clamp(last(g.h, g.kh, g.pt, g.sh), first_row, g.oh);
    first_col = std::min(first(g.pl, g.sw), g.ow);
    last_col = std::clamp(last(g.w, g.kw, g.pl, g.sw), first_col, g.ow);
  }

  bool Interior(int64_t i, int64_t j) const {
    return i >= first_row && i < last_row && j >= first_col && j < last_col;
  }
};

// Output pixels are computed from a zero-padded copy of their image (a few
// KB for RGB), so that every window lies in memory and one loop serves the
// borders too; the first version took a separate, latency-bound path for
// the border pixels (12% of a 32x32 image's) and ran at a third of the
// multiply-add rate.
struct PaddedImage {
  int64_t rows, cols;            // The padded image's size.
  std::vector<int64_t> offsets;  // Patch entry k = (a * kw + b) * C + c from the window's corner.

  explicit PaddedImage(const Geometry& g)
      : rows(std::max(g.h + g.pt, (g.oh - 1) * g.sh + g.kh)),
        cols(std::max(g.w + g.pl, (g.ow - 1) * g.sw + g.kw)) {
    for (int64_t a = 0; a < g.kh; ++a)
      for (int64_t b = 0; b < g.kw; ++b)
        for (int64_t c = 0; c < g.c; ++c) offsets.push_back((a * cols + b) * g.c + c);
  }

  // Copies image n of x into `padded` (whose border is zero and stays so).
  void Fill(const Geometry& g, const float* x, int64_t n, float* padded) const {
    for (int64_t r = 0; r < g.h; ++r) {
      std::memcpy(padded + ((r + g.pt) * cols + g.pl) * g.c, x + (n * g.h + r) * g.w * g.c,
                  g.w * g.c * sizeof(float));
    }
  }
};

// kPixels output pixels of a row (the first one's window at `corner`, the
// next ones `step` floats apart), output channels [d0, d0 + kW wide + kH
// 8-lane vectors): a register tile of accumulators, so that one filter load
// feeds kPixels multiply-adds and one broadcast input value kW + kH of them.
template <int kPixels, int kW, int kH>
inline void PixelTile(const float* corner, int64_t step, const int64_t* offsets, int64_t taps,
                      const float* w, int64_t o, int64_t d0, float* out) {
  using mobilenet::LanesOf;
  using mobilenet::LoadVector;
  using mobilenet::StoreVector;
  using mobilenet::Wide;
  constexpr int64_t wide = LanesOf<Wide>();
  Wide acc[kPixels][kW > 0 ? kW : 1] = {};
  Vec8 half[kPixels] = {};
  for (int64_t k = 0; k < taps; ++k) {
    const float* wk = w + k * o + d0;
    Wide filter[kW > 0 ? kW : 1];
    for (int v = 0; v < kW; ++v) filter[v] = mobilenet::KeepInRegister(LoadVector<Wide>(wk + v * wide));
    Vec8 filter_half;
    if constexpr (kH) filter_half = mobilenet::KeepInRegister(Load(wk + kW * wide));
    const float* at = corner + offsets[k];
    for (int p = 0; p < kPixels; ++p) {
      const float value = at[p * step];
      for (int v = 0; v < kW; ++v) acc[p][v] += value * filter[v];
      if constexpr (kH) half[p] += value * filter_half;
    }
  }
  for (int p = 0; p < kPixels; ++p) {
    for (int v = 0; v < kW; ++v) StoreVector(out + p * o + d0 + v * wide, acc[p][v]);
    if constexpr (kH) Store(out + p * o + d0 + kW * wide, half[p]);
  }
}

// Output row i of the padded image `padded`, channels [d0, d0 + the tile's
// width). Tiles of kPixels pixels; where the row is not a multiple of them,
// the last tile ends at the row's end and overlaps its predecessor (the
// overlapped pixels are computed twice, with the same result).
template <int kW, int kH>
void RowTiles(const Geometry& g, const PaddedImage& image, const float* padded, const float* w,
              int64_t i, int64_t d0, float* out) {
  // About 8 accumulators: what keeps both multiply-add units busy through
  // their latency, with registers left for the filter and the broadcast.
  constexpr int kPixels = std::max(2, 8 / (kW + kH));
  const float* row = padded + i * g.sh * image.cols * g.c;
  const int64_t step = g.sw * g.c, taps = image.offsets.size();
  if (g.ow < kPixels) {
    for (int64_t j = 0; j < g.ow; ++j) {
      PixelTile<1, kW, kH>(row + j * step, step, image.offsets.data(), taps, w, g.o, d0,
                           out + j * g.o);
    }
    return;
  }
  for (int64_t j = 0;; j += kPixels) {
    j = std::min(j, g.ow - kPixels);
    PixelTile<kPixels, kW, kH>(row + j * step, step, image.offsets.data(), taps, w, g.o, d0,
                               out + j * g.o);
    if (j + kPixels == g.ow) break;
  }
}

void Forward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* w, float* y) {
  using mobilenet::kWideTileVectors;
  using mobilenet::LanesOf;
  using mobilenet::TileShape;
  using mobilenet::Wide;
  constexpr int64_t panel = kWideTileVectors * LanesOf<Wide>();
  const PaddedImage image(g);
  const int64_t rest = g.o % panel;  // Output channels after the full panels: one narrower tile.
  mobilenet::ParallelFor(pool, g.n, mobilenet::NumChunks(pool, g.n),
                         [&](int64_t, int64_t lo, int64_t hi) {
    std::vector<float> padded(image.rows * image.cols * g.c, 0.0f);
    for (int64_t n = lo; n < hi; ++n) {
      image.Fill(g, x, n, padded.data());
      for (int64_t i = 0; i < g.oh; ++i) {
        float* out = y + (n * g.oh + i) * g.ow * g.o;
        for (int64_t d0 = 0; d0 + panel <= g.o; d0 += panel) {
          RowTiles<kWideTileVectors, 0>(g, image, padded.data(), w, i, d0, out);
        }
        mobilenet::WithTile(static_cast<int>(rest / LanesOf<Wide>()), rest % LanesOf<Wide>() != 0,
                            [&](auto shape) {
          constexpr int kW = decltype(shape)::first_type::value;
          constexpr int kH = decltype(shape)::second_type::value;
          RowTiles<kW, kH>(g, image, padded.data(), w, i, g.o - rest, out);
        });
      }
    }
  });
}

// acc[0 .. o) += v * grad[0 .. o), o a multiple of 8.
inline void AddScaled(float* acc, float v, const float* grad, int64_t o) {
  for (int64_t k = 0; k < o; k += kLanes) Store(acc + k, Load(acc + k) + v * Load(grad + k));
}

// Filter-gradient entries k0 .. k0 + kTaps (patch positions, w's order) x
// output channels [first, first + 8 * kBlocks) summed over `count` interior
// pixels of a row, in registers, then added to `image`.
template <int kBlocks, int kTaps>
inline void InteriorFilterGrad(const Geometry& g, const Window& window, const float* corner,
                               const float* grad, int64_t count, int64_t k0, int64_t first,
                               float* image) {
  Vec8 acc[kTaps][kBlocks] = {};
  const int64_t* offsets = window.offsets.data() + k0;
  const int64_t step = g.sw * g.c;
  for (int64_t p = 0; p < count; ++p) {
    Vec8 d[kBlocks];
    for (int b = 0; b < kBlocks; ++b) d[b] = Load(grad + p * g.o + first + b * kLanes);
    for (int t = 0; t < kTaps; ++t) {
      float v = corner[p * step + offsets[t]];
      for (int b = 0; b < kBlocks; ++b) acc[t][b] += v * d[b];
    }
  }
  for (int t = 0; t < kTaps; ++t) {
    for (int b = 0; b < kBlocks; ++b) {
      float* out = image + (k0 + t) * g.o + first + b * kLanes;
      Store(out, Load(out) + acc[t][b]);
    }
  }
}

// All patch positions for output channels [first, first + 8 * kBlocks) over
// the interior pixels [first_col, last_col) of row (n, i).
template <int kBlocks>
void InteriorRowFilterGrad(const Geometry& g, const Window& window, const float* x, const float* dy,
                           int64_t n, int64_t i, int64_t first, float* image) {
  constexpr int kTaps = kBlocks >= 3 ? 2 : 8 / kBlocks;  // At most 8 accumulators.
  const int64_t j = window.first_col, count = window.last_col - window.first_col;
  const float* corner = x + ((n * g.h + i * g.sh - g.pt) * g.w + j * g.sw - g.pl) * g.c;
  const float* grad = dy + ((n * g.oh + i) * g.ow + j) * g.o;
  const int64_t size = window.offsets.size();
  int64_t k0 = 0;
  for (; k0 + kTaps <= size; k0 += kTaps) {
    InteriorFilterGrad<kBlocks, kTaps>(g, window, corner, grad, count, k0, first, image);
  }
  for (; k0 < size; ++k0) {
    InteriorFilterGrad<kBlocks, 1>(g, window, corner, grad, count, k0, first, image);
  }
}

// dw[a,b,c,o] = sum_{n,i,j} x[n, i*sh+a-pt, j*sw+b-pl, c] * dy[n,i,j,o]:
// float32 per image (in an L1-sized buffer), double across images.
void FilterGrad(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* dy,
                float* dw) {
  const Window window(g);
  const int64_t size = g.kh * g.kw * g.c * g.o;
  const int64_t chunks = mobilenet::NumChunks(pool, g.n);
  std::vector<double> totals(chunks * size, 0.0);
  mobilenet::ParallelFor(pool, g.n, chunks, [&](int64_t chunk, int64_t lo, int64_t hi) {
    std::vector<float> image(size);
    double* total = totals.data() + chunk * size;
    for (int64_t n = lo; n < hi; ++n) {
      std::fill(image.begin(), image.end(), 0.0f);
      for (int64_t i = 0; i < g.oh; ++i) {
        const bool interior_row = i >= window.first_row && i < window.last_row;
        if (interior_row && window.last_col > window.first_col) {
          int64_t first = 0;
          for (; first + kMaxBlocks * kLanes <= g.o; first += kMaxBlocks * kLanes) {
            InteriorRowFilterGrad<kMaxBlocks>(g, window, x, dy, n, i, first, image.data());
          }
          switch ((g.o - first) / kLanes) {
            case 3: InteriorRowFilterGrad<3>(g, window, x, dy, n, i, first, image.data()); break;
            case 2: InteriorRowFilterGrad<2>(g, window, x, dy, n, i, first, image.data()); break;
            case 1: InteriorRowFilterGrad<1>(g, window, x, dy, n, i, first, image.data()); break;
            default: break;
          }
        }
        for (int64_t j = 0; j < g.ow; ++j) {
          if (interior_row && j >= window.first_col && j < window.last_col) continue;
          const float* grad = dy + ((n * g.oh + i) * g.ow + j) * g.o;
          ForTaps(g, x, n, i, j, [&](const float* in, int64_t tap) {
            for (int64_t c = 0; c < g.c; ++c) {
              AddScaled(image.data() + (tap * g.c + c) * g.o, in[c], grad, g.o);
            }
          });
        }
      }
      for (int64_t k = 0; k < size; ++k) total[k] += image[k];
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
