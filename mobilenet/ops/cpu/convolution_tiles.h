// The stem's dense convolution, forward: register tiles over one output row,
// shared by the convolution kernel (convolution_cpu.cc) and the depthwise
// kernel that computes the stem's output band by band as its own input
// (depthwise_cpu.cc). Layouts: x NHWC, w (kh, kw, C, O), the output row
// (OW, O), float32; O a multiple of 8.

#ifndef MOBILENET_CONVOLUTION_TILES_H_
#define MOBILENET_CONVOLUTION_TILES_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_vectors.h"

namespace mobilenet {
namespace convolution {

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pl;
};

// Both passes read a zero-padded copy of one image at a time (a few KB for
// RGB), so that every window lies in memory and one loop serves the borders
// too; the first versions took a separate, latency-bound path for the border
// pixels (12% of a 32x32 image's) and ran at a third of the multiply-add rate.
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
  constexpr int64_t wide = LanesOf<Wide>();
  Wide acc[kPixels][kW > 0 ? kW : 1] = {};
  Vec8 half[kPixels] = {};
  for (int64_t k = 0; k < taps; ++k) {
    const float* wk = w + k * o + d0;
    Wide filter[kW > 0 ? kW : 1];
    for (int v = 0; v < kW; ++v) filter[v] = KeepInRegister(LoadVector<Wide>(wk + v * wide));
    Vec8 filter_half;
    if constexpr (kH) filter_half = KeepInRegister(Load(wk + kW * wide));
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
inline void RowTiles(const Geometry& g, const PaddedImage& image, const float* padded, const float* w,
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

// Output row i of the padded image `padded`, every output channel: full panels of the widest
// tile, then one narrower tile for the channels left.
inline void ForwardRow(const Geometry& g, const PaddedImage& image, const float* padded,
                       const float* w, int64_t i, float* out) {
  constexpr int64_t panel = kWideTileVectors * LanesOf<Wide>();
  const int64_t rest = g.o % panel;
  for (int64_t d0 = 0; d0 + panel <= g.o; d0 += panel) {
    RowTiles<kWideTileVectors, 0>(g, image, padded, w, i, d0, out);
  }
  WithTile(static_cast<int>(rest / LanesOf<Wide>()), rest % LanesOf<Wide>() != 0,
           [&](auto shape) {
    constexpr int kW = decltype(shape)::first_type::value;
    constexpr int kH = decltype(shape)::second_type::value;
    RowTiles<kW, kH>(g, image, padded, w, i, g.o - rest, out);
  });
}

}  // namespace convolution
}  // namespace mobilenet

#endif  // MOBILENET_CONVOLUTION_TILES_H_
