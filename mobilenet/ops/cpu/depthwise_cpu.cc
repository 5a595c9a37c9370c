// Depthwise convolution kernels for XLA:CPU, called through jax.ffi.
//
// XLA:CPU materializes every shifted slice that a reduction reads, so the
// filter gradient of the pure-JAX 'shifted' implementation writes kh * kw
// copies of the activations per layer. These loops read each activation once
// per tap straight from cache instead. Layouts: x and dy are NHWC float32
// (channels innermost, so the channel loops vectorize), the filter is
// (kh, kw, C); strides and the low padding come as attributes. Images are
// split into chunks on XLA's thread pool; each chunk owns whole images, so no
// writes race.
//
// MobileNet's cases, a 3x3 or (V3) 5x5 filter over a multiple of 8 channels,
// have loops of their own, written once for a compile-time filter size K: 8
// channels at a time in one AVX register, the K*K taps held in registers,
// each output written once, padding handled by a zero row and by bounds
// checks on the border columns only. The general loops below run a
// runtime-length channel loop per tap, whose overhead dominated at 8-32
// channels (4.2 ms vs 0.6 ms for the 32x32x8 layer at batch 128).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "convolution_tiles.h"
#include "cpu_loops.h"
#include "cpu_vectors.h"
#include "pointwise_tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c, kh, kw, oh, ow, sh, sw, pt, pl;
};

// Runs body(first_image, last_image, chunk) over chunks of the batch on XLA's
// intra-op thread pool (cpu_loops.h).
template <typename Body>
void ForImages(ffi::ThreadPool& pool, int64_t n, int64_t chunks, Body body) {
  mobilenet::ParallelFor(pool, n, chunks,
                         [&](int64_t chunk, int64_t lo, int64_t hi) { body(lo, hi, chunk); });
}

using mobilenet::kLanes;
using mobilenet::Load;
using mobilenet::Store;
using mobilenet::Vec8;

// Whether the vectorized loops can run: a square 3x3 or 5x5 filter, a multiple of 8 channels.
bool VectorizedShape(const Geometry& g) {
  return g.kh == g.kw && (g.kh == 3 || g.kh == 5) && g.c % kLanes == 0 && g.pt >= 0 && g.pl >= 0;
}

// Calls body(std::integral_constant<int, K>) for the filter size K of a vectorized geometry.
template <typename Body>
void WithFilterSize(const Geometry& g, Body body) {
  if (g.kh == 3) return body(std::integral_constant<int, 3>());
  return body(std::integral_constant<int, 5>());
}

// The output columns [first, last) whose K input columns j * stride - pad
// + {0 .. K-1} all lie inside [0, width): no bounds checks needed there.
struct Columns {
  int64_t first, last;
};

Columns InteriorColumns(int64_t width, int64_t out_width, int64_t stride, int64_t pad, int64_t k) {
  int64_t first = std::min((pad + stride - 1) / stride, out_width);
  int64_t last = width - k + pad >= 0 ? (width - k + pad) / stride + 1 : 0;
  return {first, std::clamp(last, first, out_width)};
}

// Whether the vectorized loops apply and pay: a 5x5 filter over maps no wider than it (V3's last
// blocks, 2x2 to 4x4 at 32x32 inputs) leaves no interior column, and there the bounds-checked
// loops over 25 taps took twice as long as the general loops.
bool Vectorized(const Geometry& g) {
  if (!VectorizedShape(g)) return false;
  Columns interior = InteriorColumns(g.w, g.ow, g.sw, g.pl, g.kw);
  return g.kh == 3 || interior.last > interior.first;
}

// Calls column(j, checked) for j in [0, out_width), checked = false on the interior.
template <typename Column>
void ForColumns(const Columns& interior, int64_t out_width, Column column) {
  for (int64_t j = 0; j < interior.first; ++j) column(j, std::true_type());
  for (int64_t j = interior.first; j < interior.last; ++j) column(j, std::false_type());
  for (int64_t j = interior.last; j < out_width; ++j) column(j, std::true_type());
}

// Row pointers for output row i: the K input rows it reads (a row of zeros
// where the window hangs over the top or bottom edge).
template <int K>
void InputRows(const Geometry& g, const float* image, const float* zeros, int64_t i,
               const float* rows[K]) {
  for (int64_t a = 0; a < K; ++a) {
    int64_t r = i * g.sh + a - g.pt;
    rows[a] = (r < 0 || r >= g.h) ? zeros : image + r * g.w * g.c;
  }
}

// One image of the K x K forward (channels a multiple of 8); epilogue(acc, cb)
// maps each output vector (channels cb .. cb + 7) before it is stored. One
// accumulator per filter row: K short chains of multiply-adds rather than
// one of K*K, whose latency would bound the loop.
template <int K, typename Epilogue>
void ForwardImage(const Geometry& g, const Columns& interior, const float* image,
                  const float* zeros, const float* f, float* out_image, Epilogue epilogue) {
  for (int64_t i = 0; i < g.oh; ++i) {
    const float* rows[K];
    InputRows<K>(g, image, zeros, i, rows);
    float* out = out_image + i * g.ow * g.c;
    for (int64_t cb = 0; cb < g.c; cb += kLanes) {
      Vec8 taps[K * K];
      for (int k = 0; k < K * K; ++k) taps[k] = Load(f + k * g.c + cb);
      ForColumns(interior, g.ow, [&](int64_t j, auto checked) {
        int64_t q0 = j * g.sw - g.pl;
        Vec8 acc[K] = {};
        for (int a = 0; a < K; ++a) {
          for (int b = 0; b < K; ++b) {
            if (checked && (q0 + b < 0 || q0 + b >= g.w)) continue;
            acc[a] += Load(rows[a] + (q0 + b) * g.c + cb) * taps[a * K + b];
          }
        }
        for (int a = 1; a < K; ++a) acc[0] += acc[a];
        Store(out + j * g.c + cb, epilogue(acc[0], cb));
      });
    }
  }
}

// Forward, K x K filter, channels a multiple of 8.
template <int K>
void ForwardVectorized(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* f,
                       float* y) {
  const std::vector<float> zeros(g.w * g.c, 0.0f);
  const Columns interior = InteriorColumns(g.w, g.ow, g.sw, g.pl, K);
  ForImages(pool, g.n, mobilenet::NumChunks(pool, g.n), [&](int64_t lo, int64_t hi, int64_t) {
    for (int64_t n = lo; n < hi; ++n) {
      ForwardImage<K>(g, interior, x + n * g.h * g.w * g.c, zeros.data(), f,
                      y + n * g.oh * g.ow * g.c, [](Vec8 acc, int64_t) { return acc; });
    }
  });
}

// Inference with each BatchNorm + activation as a per-channel affine map and
// an activation (models/fused_inference.py): the previous layer's applied to
// each image as it is read (into a per-thread buffer, where the K*K taps then
// read it), this layer's to each output before it is stored, so neither costs
// a pass of its own over memory:
// y = out_act(depthwise(in_act(x * in_scale + in_bias)) * out_scale + out_bias).
// The activations: clip(z, lo, hi) (ReLU, ReLU6, none) or hard-swish.
using mobilenet::kClip;
using mobilenet::kHardSwish;

// Pointwise(): the same map on any vector width, for an expansion's product (pointwise_tiles.h).
// Gate(z, d): d * activation'(z), the gradient at z from the gradient d at the activation's
// output, with batch_norm_cpu.cc's derivatives (those of jax.nn.relu, relu6 and hard_swish).
struct ClipActivation {
  Vec8 lo, hi;
  Vec8 operator()(Vec8 z) const { return mobilenet::Clip(z, lo, hi); }
  Vec8 Gate(Vec8 z, Vec8 d) const {
    const Vec8 zero = {};
    return (z > lo) & (z < hi) ? d : zero;
  }
  mobilenet::pointwise::ClipAct Pointwise() const { return {lo[0], hi[0]}; }
};

struct HardSwishActivation {
  Vec8 operator()(Vec8 z) const {  // z * relu6(z + 3) / 6, as jax.nn.hard_swish.
    const Vec8 zero = {}, six = zero + 6.0f;
    return z * mobilenet::Clip(z + 3.0f, zero, six) * (1.0f / 6.0f);
  }
  Vec8 Gate(Vec8 z, Vec8 d) const {  // 0 up to -3, 1 from 3, z / 3 + 1/2 between.
    const Vec8 zero = {}, one = zero + 1.0f, three = zero + 3.0f;
    Vec8 slope = z * (1.0f / 3.0f) + 0.5f;
    slope = z <= -three ? zero : slope;
    return (z >= three ? one : slope) * d;
  }
  mobilenet::pointwise::HardSwishAct Pointwise() const { return {}; }
};

struct Affine {
  const float* scale;
  const float* bias;
  int32_t kind;  // ActivationKind
  float lo, hi;  // kClip's bounds.
};

// Calls body(activation) with the activation an Affine names.
template <typename Body>
void WithActivation(const Affine& affine, Body body) {
  if (affine.kind == kHardSwish) return body(HardSwishActivation{});
  const Vec8 zero = {};
  body(ClipActivation{zero + affine.lo, zero + affine.hi});
}

// The activated input goes into a per-thread buffer with the padding around
// it (zero columns written once, zero rows where a band hangs over the top or
// bottom edge), so the K*K loop runs without bounds checks on every column:
// on V3's 2x2 and 4x4 maps a 5x5 filter has no interior column. The image is
// taken in bands of output rows whose input rows fit in L2 (kBandBytes), so
// the taps read the activated rows from cache; a band recomputes the K - stride
// rows it shares with the one before (at 224x224 a whole activated image of
// 96 channels is ~5 MB, and the kernel took 1.5x as long).
constexpr int64_t kBandBytes = 512 * 1024;

// The bands of output rows an image is taken in, for a K x K filter.
struct Bands {
  int64_t row_values;  // Values per row of the padded buffer.
  int64_t band_oh;     // Output rows per band (the last band may have fewer).
  int64_t band_rows;   // Input rows a full band reads.
};

template <int K>
Bands MakeBands(const Geometry& g, int64_t band_bytes = kBandBytes) {
  const int64_t padded_w = std::max(g.w + g.pl, (g.ow - 1) * g.sw + K);
  const int64_t row_values = padded_w * g.c;
  const int64_t fitting_rows = std::max<int64_t>(K, band_bytes / (sizeof(float) * row_values));
  const int64_t band_oh = std::clamp<int64_t>((fitting_rows - K) / g.sh + 1, 1, g.oh);
  return Bands{row_values, band_oh, (band_oh - 1) * g.sh + K};
}

// Writes in_act(x * scale + bias) of the input rows that output rows [first, first + rows_out)
// read into `activated` (band row b = input row first * sh + b - pt, shifted right by the left
// padding; zeros where a row lies outside the image; the padding columns are never written, so
// they stay as the caller zeroed them). Returns the number of band rows.
template <int K, typename InActivation>
int64_t ActivateBand(const Geometry& g, const Bands& bands, const float* image, const Affine& in,
                     InActivation in_act, int64_t first, int64_t rows_out, float* activated) {
  const int64_t rows_in = (rows_out - 1) * g.sh + K;
  for (int64_t b = 0; b < rows_in; ++b) {
    const int64_t r = first * g.sh + b - g.pt;
    float* row = activated + b * bands.row_values + g.pl * g.c;
    if (r < 0 || r >= g.h) {
      std::fill(row, row + g.w * g.c, 0.0f);
      continue;
    }
    const float* source = image + r * g.w * g.c;
    for (int64_t q = 0; q < g.w * g.c; q += g.c) {
      for (int64_t cb = 0; cb < g.c; cb += kLanes) {
        Vec8 v = Load(source + q + cb) * Load(in.scale + cb) + Load(in.bias + cb);
        Store(row + q + cb, in_act(v));
      }
    }
  }
  return rows_in;
}

// Maps no larger than the filter (V3's 2x2 and 4x4 maps under 5x5 filters, V1's 2x2 under 3x3 in
// the 32x32 form): there the padded band loop spends most of its K*K taps on padding (21 of 25
// for every output of a 2x2 map), so each output takes only the taps that land on the image.
// The image is activated once into a per-thread buffer; channels go 8 at a time, inner-most.
bool SmallMap(const Geometry& g) { return g.h <= g.kh && g.w <= g.kw; }

// The filter taps [first, last) of output position i that land inside an input of `size`.
inline std::pair<int64_t, int64_t> InsideTaps(int64_t i, int64_t stride, int64_t pad, int64_t k,
                                              int64_t size) {
  const int64_t start = i * stride - pad;
  return {std::max<int64_t>(0, -start), std::min<int64_t>(k, size - start)};
}

// SmallMapImage (below) on maps of up to 4 outputs: output by output, each summing only its own
// taps (4 of 25 on a 2x2 map under 5x5), loaded with the input. The running total lives in the
// output row (in L1) between filter rows.
template <int K, typename Epilogue>
void SmallMapImageByOutput(const Geometry& g, const float* image, const float* f, float* output,
                           Epilogue epilogue) {
  for (int64_t i = 0; i < g.oh; ++i) {
    const auto [a0, a1] = InsideTaps(i, g.sh, g.pt, K, g.h);
    for (int64_t j = 0; j < g.ow; ++j) {
      const auto [b0, b1] = InsideTaps(j, g.sw, g.pl, K, g.w);
      const float* corner = image + ((i * g.sh - g.pt) * g.w + j * g.sw - g.pl) * g.c;
      float* result = output + (i * g.ow + j) * g.c;
      std::fill(result, result + g.c, 0.0f);
      for (int64_t a = a0; a < a1; ++a) {
        const float* row = corner + a * g.w * g.c;
        const float* taps = f + a * K * g.c;
        for (int64_t cb = 0; cb < g.c; cb += kLanes) {
          Vec8 acc = {};
          for (int64_t b = b0; b < b1; ++b) acc += Load(row + b * g.c + cb) * Load(taps + b * g.c + cb);
          Store(result + cb, Load(result + cb) + acc);
        }
      }
      for (int64_t cb = 0; cb < g.c; cb += kLanes) Store(result + cb, epilogue(Load(result + cb), cb));
    }
  }
}

// SmallMapImage on larger maps (V3's 4x4 under 5x5: 196 of 400 taps on the image): channels go 8
// at a time in the outer loop, so that the block's K*K taps stay in registers (the filter loops
// are unrolled; a tap off the image is a branch, in the same pattern for every block). On 2x2
// maps the per-output loop above was faster: K*K branches there guard only 4 taps per output.
template <int K, typename Epilogue>
void SmallMapImageByChannels(const Geometry& g, const float* image, const float* f, float* output,
                             Epilogue epilogue) {
  for (int64_t cb = 0; cb < g.c; cb += kLanes) {
    Vec8 taps[K * K];
    for (int k = 0; k < K * K; ++k) taps[k] = Load(f + k * g.c + cb);
    for (int64_t i = 0; i < g.oh; ++i) {
      const auto [a0, a1] = InsideTaps(i, g.sh, g.pt, K, g.h);
      for (int64_t j = 0; j < g.ow; ++j) {
        const auto [b0, b1] = InsideTaps(j, g.sw, g.pl, K, g.w);
        // Where tap (0, 0) would read: off the image, but only taps on it are read.
        const int64_t corner = ((i * g.sh - g.pt) * g.w + j * g.sw - g.pl) * g.c + cb;
        Vec8 acc[K] = {};
#pragma GCC unroll 5
        for (int a = 0; a < K; ++a) {
          if (a < a0 || a >= a1) continue;
#pragma GCC unroll 5
          for (int b = 0; b < K; ++b) {
            if (b < b0 || b >= b1) continue;
            acc[a] += Load(image + corner + (a * g.w + b) * g.c) * taps[a * K + b];
          }
        }
        for (int a = 1; a < K; ++a) acc[0] += acc[a];
        Store(output + (i * g.ow + j) * g.c + cb, epilogue(acc[0], cb));
      }
    }
  }
}

// One image of a K x K correlation on a map no larger than the filter: only the taps that land
// on `image`; epilogue(sum, cb) maps each output vector before it is stored. Summed in
// ForwardImage's order, per filter row and then the rows in turn, which the skipped taps (zeros
// there) do not change: the same floats as the band loop.
template <int K, typename Epilogue>
void SmallMapImage(const Geometry& g, const float* image, const float* f, float* output,
                   Epilogue epilogue) {
  if (g.oh * g.ow <= 4) return SmallMapImageByOutput<K>(g, image, f, output, epilogue);
  SmallMapImageByChannels<K>(g, image, f, output, epilogue);
}

// in_act(image * scale + bias) of one whole image (g.h * g.w pixels) into `activated`.
template <typename InActivation>
void ActivateImage(const Geometry& g, const float* image, const Affine& in, InActivation in_act,
                   float* activated) {
  for (int64_t p = 0; p < g.h * g.w * g.c; p += g.c) {
    for (int64_t cb = 0; cb < g.c; cb += kLanes) {
      Store(activated + p + cb, in_act(Load(image + p + cb) * Load(in.scale + cb) + Load(in.bias + cb)));
    }
  }
}

// Inference on a small map: the image activated once into a per-thread buffer, then SmallMapImage.
template <int K, typename InActivation, typename OutActivation>
void InferenceSmallMap(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* f,
                       const Affine& in, InActivation in_act, const Affine& out,
                       OutActivation out_act, float* y) {
  const int64_t values = g.h * g.w * g.c;
  ForImages(pool, g.n, mobilenet::NumChunks(pool, g.n), [&](int64_t lo, int64_t hi, int64_t) {
    std::vector<float> activated(values);
    for (int64_t n = lo; n < hi; ++n) {
      ActivateImage(g, x + n * values, in, in_act, activated.data());
      SmallMapImage<K>(g, activated.data(), f, y + n * g.oh * g.ow * g.c, [&](Vec8 sum, int64_t cb) {
        return out_act(sum * Load(out.scale + cb) + Load(out.bias + cb));
      });
    }
  });
}

template <int K, typename InActivation, typename OutActivation>
void InferenceForward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* f,
                      const Affine& in, InActivation in_act, const Affine& out,
                      OutActivation out_act, float* y) {
  if (SmallMap(g)) return InferenceSmallMap<K>(pool, g, x, f, in, in_act, out, out_act, y);
  const Bands bands = MakeBands<K>(g);
  const int64_t padded_w = bands.row_values / g.c;
  const Columns all{0, g.ow};
  ForImages(pool, g.n, mobilenet::NumChunks(pool, g.n), [&](int64_t lo, int64_t hi, int64_t) {
    std::vector<float> activated(bands.band_rows * bands.row_values, 0.0f);
    for (int64_t n = lo; n < hi; ++n) {
      const float* image = x + n * g.h * g.w * g.c;
      for (int64_t first = 0; first < g.oh; first += bands.band_oh) {
        const int64_t rows_out = std::min(bands.band_oh, g.oh - first);
        const int64_t rows_in =
            ActivateBand<K>(g, bands, image, in, in_act, first, rows_out, activated.data());
        const Geometry band{1, rows_in, padded_w, g.c, K, K, rows_out, g.ow, g.sh, g.sw, 0, 0};
        ForwardImage<K>(band, all, activated.data(), nullptr, f,
                        y + (n * g.oh + first) * g.ow * g.c, [&](Vec8 acc, int64_t cb) {
                          return out_act(acc * Load(out.scale + cb) + Load(out.bias + cb));
                        });
      }
    }
  });
}

// Inference with the layers around the depthwise layer fused in (models/fused_inference.py):
//   y = InferenceForward(x) @ w * pw.scale + pw.bias + residual,
// or InferenceForward of in_act(e(x) * in.scale + in.bias), where e is the layer in front
// computed inside the kernel: an inverted residual block's expansion (x @ expansion.w) or the
// network's stem (a dense convolution of the images). Each band of the depthwise layer's input
// rows is computed into a per-thread buffer (the rows it shares with the band before kept, not
// recomputed), and each band of its output rows goes into a per-thread buffer and from there,
// while in cache, into the projection's register tiles (pointwise_tiles.h); w == nullptr leaves
// the projection out (squeeze-and-excitation's gate needs the whole depthwise output first) and
// writes the depthwise output. Neither the depthwise layer's input nor its output is written
// to memory and read back. The projection's epilogue is linear: V1's raw product (its BatchNorm
// pending for the next depthwise layer), or an inverted residual block's projection with its
// BatchNorm and residual add. With `residual_from_input` the residual is the depthwise layer's
// input as the layer in front computed it (V3-Large's first block: the stem's activated output,
// stride 1), copied from the band buffer rather than read from memory. Without the projection,
// `mean` (if given) gets each image's mean depthwise output per channel, summed from each band
// as it is written: squeeze-and-excitation's pooling, without a pass of its own over memory.
// The band is smaller than InferenceForward's (kSeparableBandBytes): its output rows must stay
// in L2 too.
constexpr int64_t kSeparableBandBytes = 256 * 1024;

// The layer in front of the depthwise layer, whose output, with the depthwise layer's `in`
// BatchNorm + activation, is the depthwise layer's input: a V2/V3 block's expansion (x the
// block's input (N, H, W, c), w its (c, C) kernel) or, with `stem`, the network's stem (x the
// images (N, H0, W0, c), w its (kh, kw, c, C) kernel, `stem` its geometry, `stem_image` the
// padded copy's layout).
struct InputLayer {
  const float* x;
  const float* w;
  int64_t c;
  const mobilenet::convolution::Geometry* stem = nullptr;
  const mobilenet::convolution::PaddedImage* stem_image = nullptr;
};

// The expansion of `pixels` consecutive pixels of the block input from pixel `first` (counted
// over the whole batch) into `out`, `channels` values each.
template <typename InActivation>
void ExpandPixels(const InputLayer& e, const Affine& in, InActivation in_act, int64_t channels,
                  int64_t first, int64_t pixels, float* out) {
  mobilenet::pointwise::ForwardRows(e.x + first * e.c, nullptr, 1, e.w, {in.scale, in.bias},
                                    in_act.Pointwise(), nullptr, 0, pixels, e.c, channels, out);
}

// A thread's padded copy of the image whose stem rows it computes (convolution_tiles.h).
struct StemScratch {
  std::vector<float> padded;
  int64_t image = -1;
};

// Rows [r0, r1) of image n of the depthwise layer's input, computed by the layer in front, into
// `out` (row r at (r - r0) * w * C).
template <typename InActivation>
void InputLayerRows(const Geometry& g, const InputLayer& e, const Affine& in, InActivation in_act,
                    int64_t n, int64_t r0, int64_t r1, StemScratch& scratch, float* out) {
  if (e.stem == nullptr) {
    return ExpandPixels(e, in, in_act, g.c, (n * g.h + r0) * g.w, (r1 - r0) * g.w, out);
  }
  if (scratch.image != n) {
    if (scratch.padded.empty()) {
      scratch.padded.assign(e.stem_image->rows * e.stem_image->cols * e.c, 0.0f);
    }
    e.stem_image->Fill(*e.stem, e.x, n, scratch.padded.data());
    scratch.image = n;
  }
  for (int64_t r = r0; r < r1; ++r) {
    mobilenet::convolution::ForwardRow(*e.stem, *e.stem_image, scratch.padded.data(), e.w, r,
                                       out + (r - r0) * g.w * g.c);
  }
  Geometry rows = g;
  rows.h = r1 - r0;
  ActivateImage(rows, out, in, in_act, out);  // In place, while the rows are in cache.
}

// The image rows an input band buffer holds: [lo, hi), row lo first.
struct HeldRows {
  int64_t lo = 0, hi = 0;
};

// Image n's rows [r0, r1) of the depthwise layer's input into `band` (row r at (r - r0) * w * C):
// the rows the buffer already holds from the band before moved to the front, the others computed.
template <typename InActivation>
void InputBand(const Geometry& g, const InputLayer& e, const Affine& in, InActivation in_act,
               int64_t n, int64_t r0, int64_t r1, HeldRows& held, StemScratch& scratch,
               float* band) {
  const int64_t row = g.w * g.c;
  int64_t from = r0;
  if (held.lo <= r0 && r0 < held.hi) {
    from = std::min(held.hi, r1);
    std::memmove(band, band + (r0 - held.lo) * row, sizeof(float) * (from - r0) * row);
  }
  if (r1 > from) InputLayerRows(g, e, in, in_act, n, from, r1, scratch, band + (from - r0) * row);
  held = {r0, r1};
}

// g: the depthwise layer's geometry (its input: the layer in front's output, if any).
template <int K, typename InActivation, typename OutActivation>
void SeparableInference(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* f,
                        const Affine& in, InActivation in_act, const Affine& out,
                        OutActivation out_act, const InputLayer* input_layer, const float* w,
                        int64_t d, const mobilenet::pointwise::Epilogue& pw,
                        const float* residual, bool residual_from_input, float* y,
                        float* mean) {
  const bool small = SmallMap(g), project = w != nullptr;
  const Bands bands = MakeBands<K>(g, kSeparableBandBytes);
  const int64_t band_oh = small ? g.oh : bands.band_oh;
  const Geometry padded{1, 0, bands.row_values / g.c, g.c, K, K, 0, g.ow, g.sh, g.sw, 0, 0};
  const Columns all{0, g.ow}, interior = InteriorColumns(g.w, g.ow, g.sw, g.pl, K);
  auto epilogue = [&](Vec8 acc, int64_t cb) {
    return out_act(acc * Load(out.scale + cb) + Load(out.bias + cb));
  };
  // Output rows are gathered, band after band and image after image, until the buffer is full:
  // on small maps (V1's 2x2 and 4x4 at 32x32) one image's band is a few rows, and a product per
  // band would read all of w for each few rows.
  const int64_t capacity =
      std::max(band_oh * g.ow, kSeparableBandBytes / static_cast<int64_t>(sizeof(float) * g.c));
  // The depthwise input: a whole small map, or band by band, activated into a padded buffer or
  // computed by the layer in front. A computed band is read where it was computed, bounds-checked
  // at the border columns, or (5x5: two checked columns on each side, 25 taps each; 4 of a 7x7
  // map's 7) from a padded copy: measured both ways, the copy paid for 5x5 filters and not for
  // 3x3 ones (docs/performance.md, fourteenth round).
  constexpr bool kPaddedCopy = K == 5;
  const int64_t buffer = small                        ? g.h * g.w * g.c
                         : input_layer && !kPaddedCopy ? 0
                                                       : bands.band_rows * bands.row_values;
  ForImages(pool, g.n, mobilenet::NumChunks(pool, g.n), [&](int64_t lo, int64_t hi, int64_t) {
    std::vector<float> activated(buffer, 0.0f);
    std::vector<float> computed(input_layer && !small ? bands.band_rows * g.w * g.c : 0);
    std::vector<float> zeros(input_layer && !kPaddedCopy ? g.w * g.c : 0, 0.0f);  // Off-image rows.
    StemScratch stem_scratch;
    std::vector<float> gathered(project ? capacity * g.c : 0);
    std::vector<float> gathered_input(residual_from_input ? capacity * d : 0);
    int64_t first_row = lo * g.oh * g.ow, filled = 0;  // Gathered: rows [first_row, + filled) of y.
    auto flush = [&] {
      mobilenet::pointwise::ForwardRows(gathered.data(), nullptr, 1, w, pw,
                                        mobilenet::pointwise::IdentityAct{},
                                        residual_from_input ? gathered_input.data()
                                        : residual          ? residual + first_row * d
                                                            : nullptr,
                                        0, filled,
                                        g.c, d, y + first_row * d);
      first_row += filled;
      filled = 0;
    };
    // The residual's rows beside the output rows they are added to: at stride 1 with the same
    // channels, output rows [first, + rows_out) add input rows [first, + rows_out), `rows` on.
    auto keep_input = [&](const float* rows, int64_t rows_out) {
      if (residual_from_input) {
        std::memcpy(gathered_input.data() + filled * d, rows, sizeof(float) * rows_out * g.ow * d);
      }
    };
    for (int64_t n = lo; n < hi; ++n) {
      const float* image = x + n * g.h * g.w * g.c;
      HeldRows held;
      if (mean != nullptr) std::fill(mean + n * g.c, mean + (n + 1) * g.c, 0.0f);
      if (small && input_layer) {
        InputLayerRows(g, *input_layer, in, in_act, n, 0, g.h, stem_scratch, activated.data());
      } else if (small) {
        ActivateImage(g, image, in, in_act, activated.data());
      }
      for (int64_t first = 0; first < g.oh; first += band_oh) {
        const int64_t rows_out = std::min(band_oh, g.oh - first);
        if (project && filled + rows_out * g.ow > capacity) flush();
        float* out = project ? gathered.data() + filled * g.c : y + (n * g.oh + first) * g.ow * g.c;
        if (small) {
          SmallMapImage<K>(g, activated.data(), f, out, epilogue);
          keep_input(activated.data(), rows_out);
        } else if (input_layer) {
          const int64_t top = first * g.sh - g.pt;  // The band's first input row, maybe padding.
          const int64_t rows_in = (rows_out - 1) * g.sh + K;
          const int64_t r0 = std::max<int64_t>(0, top), r1 = std::min(g.h, top + rows_in);
          InputBand(g, *input_layer, in, in_act, n, r0, r1, held, stem_scratch, computed.data());
          keep_input(computed.data() + (first - r0) * g.w * g.c, rows_out);
          if constexpr (kPaddedCopy) {
            for (int64_t b = 0; b < rows_in; ++b) {
              float* row = activated.data() + b * bands.row_values + g.pl * g.c;
              const int64_t r = top + b;
              if (r < r0 || r >= r1) {
                std::fill(row, row + g.w * g.c, 0.0f);
              } else {
                std::memcpy(row, computed.data() + (r - r0) * g.w * g.c, sizeof(float) * g.w * g.c);
              }
            }
            Geometry band = padded;
            band.h = rows_in;
            band.oh = rows_out;
            ForwardImage<K>(band, all, activated.data(), nullptr, f, out, epilogue);
          } else {
            const Geometry band{1, r1 - r0, g.w, g.c, K, K, rows_out, g.ow, g.sh, g.sw, r0 - top, g.pl};
            ForwardImage<K>(band, interior, computed.data(), zeros.data(), f, out, epilogue);
          }
        } else {
          Geometry band = padded;
          band.h = ActivateBand<K>(g, bands, image, in, in_act, first, rows_out, activated.data());
          band.oh = rows_out;
          ForwardImage<K>(band, all, activated.data(), nullptr, f, out, epilogue);
        }
        if (project) filled += rows_out * g.ow;
        if (mean != nullptr) {  // The rows just written, from cache.
          float* sum = mean + n * g.c;
          for (const float* pixel = out; pixel < out + rows_out * g.ow * g.c; pixel += g.c) {
            for (int64_t cb = 0; cb < g.c; cb += kLanes) {
              Store(sum + cb, Load(sum + cb) + Load(pixel + cb));
            }
          }
        }
      }
      if (mean != nullptr) {
        const float pixels = static_cast<float>(g.oh * g.ow);
        for (int64_t ch = 0; ch < g.c; ++ch) mean[n * g.c + ch] /= pixels;
      }
    }
    if (filled > 0) flush();
  });
}

// Input gradient at stride 1, K x K: the forward correlation of dy with the
// filter flipped in both axes and the padding mirrored (K - 1 - pad).
bool InputGradAsForward(const Geometry& g) {
  if (!VectorizedShape(g) || g.sh != 1 || g.sw != 1 || g.pt > g.kh - 1 || g.pl > g.kw - 1) {
    return false;
  }
  const Geometry transposed{g.n, g.oh, g.ow, g.c, g.kh, g.kw, g.h, g.w, 1, 1, g.kh - 1 - g.pt,
                            g.kw - 1 - g.pl};
  return Vectorized(transposed) || SmallMap(transposed);
}

// The taps of one input line (row or column) r of a strided layer: the
// output lines i = (r + pad - a) / stride that read it, through filter tap a
// (at most ceil(K / stride) of them, K along an axis of stride 1; K <= 5).
struct LineTaps {
  int64_t count = 0;
  int64_t tap[5], line[5];
};

std::vector<LineTaps> TapsPerLine(int64_t size, int64_t out_size, int64_t stride, int64_t pad,
                                  int64_t k) {
  std::vector<LineTaps> lines(size);
  for (int64_t r = 0; r < size; ++r) {
    for (int64_t a = 0; a < k; ++a) {
      const int64_t reach = r + pad - a;
      if (reach < 0 || reach % stride || reach / stride >= out_size) continue;
      LineTaps& taps = lines[r];
      taps.tap[taps.count] = a;
      taps.line[taps.count++] = reach / stride;
    }
  }
  return lines;
}

// How one image's input gradient is computed, decided once per call:
// - kAsForward: stride 1, the forward band loop over dy with the flipped filter (InputGradAsForward);
//   a gradient map no larger than the filter goes through SmallMapImage, only the taps that land
//   on it (the band loop refuses such maps, see Vectorized);
// - kStrided: stride > 1, 3x3 or 5x5, channels a multiple of 8: gathered, one input pixel at a
//   time, from the gradient pixels that read it (1 to 4 for 3x3 at stride 2), channels innermost
//   while the pixel is in L1, and written once. The general loop scatters every gradient pixel
//   into K*K input pixels with a read-modify-write each and took 1.5-3x as long
//   (docs/performance.md, thirteenth round);
// - kGeneral: any other shape.
struct InputGradPlan {
  enum Mode { kAsForward, kStrided, kGeneral };
  Mode mode;
  Geometry g;
  const float* f;
  Geometry transposed;              // kAsForward: dy's correlation with `flipped`.
  Columns interior;                 // kAsForward: its interior columns.
  std::vector<float> flipped;       // kAsForward: f flipped in both axes.
  std::vector<float> zeros;         // kAsForward: a row of zeros of dy's width.
  std::vector<LineTaps> rows, cols; // kStrided.
};

InputGradPlan PlanInputGrad(const Geometry& g, const float* f) {
  InputGradPlan plan{InputGradPlan::kGeneral, g, f};
  if (InputGradAsForward(g)) {
    plan.mode = InputGradPlan::kAsForward;
    const int64_t taps = g.kh * g.kw;
    plan.flipped.resize(taps * g.c);
    for (int64_t k = 0; k < taps; ++k) {
      std::copy(f + (taps - 1 - k) * g.c, f + (taps - k) * g.c, plan.flipped.data() + k * g.c);
    }
    plan.transposed = Geometry{g.n, g.oh, g.ow, g.c, g.kh, g.kw, g.h, g.w, 1, 1, g.kh - 1 - g.pt,
                               g.kw - 1 - g.pl};
    plan.interior = InteriorColumns(g.ow, g.w, 1, plan.transposed.pl, g.kw);
    plan.zeros.assign(g.ow * g.c, 0.0f);
  } else if (VectorizedShape(g) && (g.sh > 1 || g.sw > 1)) {
    plan.mode = InputGradPlan::kStrided;
    plan.rows = TapsPerLine(g.h, g.oh, g.sh, g.pt, g.kh);
    plan.cols = TapsPerLine(g.w, g.ow, g.sw, g.pl, g.kw);
  }
  return plan;
}

// Rows [r0, r1) of one image's input gradient: dx[r,q,c] = sum over the (i,j,a,b) that read
// (r,q) of dy[i,j,c] * f[a,b,c], every value of those rows written (dy and dx point at the
// image). The general loop scatters, and writes the whole image whatever the rows.
void InputGradRows(const InputGradPlan& p, const float* dy, float* dx, int64_t r0, int64_t r1) {
  const Geometry& g = p.g;
  if (p.mode == InputGradPlan::kAsForward) {
    return WithFilterSize(g, [&](auto k) {
      constexpr int K = decltype(k)::value;
      const auto same = [](Vec8 sum, int64_t) { return sum; };
      if (SmallMap(p.transposed)) return SmallMapImage<K>(p.transposed, dy, p.flipped.data(), dx, same);
      Geometry rows = p.transposed;  // Its output rows [r0, r1): the input gradient's.
      rows.oh = r1 - r0;
      rows.pt -= r0;
      ForwardImage<K>(rows, p.interior, dy, p.zeros.data(), p.flipped.data(),
                      dx + r0 * g.w * g.c, same);
    });
  }
  if (p.mode == InputGradPlan::kStrided) {
    for (int64_t r = r0; r < r1; ++r) {
      const LineTaps& row = p.rows[r];
      float* out = dx + r * g.w * g.c;
      for (int64_t q = 0; q < g.w; ++q) {
        const LineTaps& col = p.cols[q];
        float* pixel = out + q * g.c;
        bool first = true;  // The first gradient pixel writes, the others add.
        for (int64_t u = 0; u < row.count; ++u) {
          const float* grad_row = dy + row.line[u] * g.ow * g.c;
          const float* tap_row = p.f + row.tap[u] * g.kw * g.c;
          for (int64_t v = 0; v < col.count; ++v, first = false) {
            const float* grad = grad_row + col.line[v] * g.c;
            const float* taps = tap_row + col.tap[v] * g.c;
            for (int64_t cb = 0; cb < g.c; cb += kLanes) {
              const Vec8 term = Load(grad + cb) * Load(taps + cb);
              Store(pixel + cb, first ? term : Load(pixel + cb) + term);
            }
          }
        }
        if (first) std::fill(pixel, pixel + g.c, 0.0f);  // No gradient pixel reads it.
      }
    }
    return;
  }
  std::memset(dx, 0, sizeof(float) * g.h * g.w * g.c);
  for (int64_t i = 0; i < g.oh; ++i) {
    for (int64_t j = 0; j < g.ow; ++j) {
      const float* grad = dy + (i * g.ow + j) * g.c;
      for (int64_t a = 0; a < g.kh; ++a) {
        int64_t r = i * g.sh + a - g.pt;
        if (r < 0 || r >= g.h) continue;
        for (int64_t b = 0; b < g.kw; ++b) {
          int64_t q = j * g.sw + b - g.pl;
          if (q < 0 || q >= g.w) continue;
          float* out = dx + (r * g.w + q) * g.c;
          const float* tap = p.f + (a * g.kw + b) * g.c;
          for (int64_t c = 0; c < g.c; ++c) out[c] += grad[c] * tap[c];
        }
      }
    }
  }
}

// Whether InputGradRows computes any rows asked for, not the whole image.
bool InputGradByRows(const InputGradPlan& p) {
  return p.mode == InputGradPlan::kStrided ||
         (p.mode == InputGradPlan::kAsForward && !SmallMap(p.transposed));
}

// dx[n,r,q,c] = sum over the (i,j,a,b) that read (r,q) of dy[n,i,j,c] * f[a,b,c].
void InputGrad(ffi::ThreadPool& pool, const Geometry& g, const float* dy, const float* f,
               float* dx) {
  const InputGradPlan plan = PlanInputGrad(g, f);
  ForImages(pool, g.n, mobilenet::NumChunks(pool, g.n), [&](int64_t lo, int64_t hi, int64_t) {
    for (int64_t n = lo; n < hi; ++n) {
      InputGradRows(plan, dy + n * g.oh * g.ow * g.c, dx + n * g.h * g.w * g.c, 0, g.h);
    }
  });
}

// The backward pass of depthwise(in_act(x * in_scale + in_bias)) with batch statistics
// (ops/norm_depthwise.py), in one pass over each image's bands of rows:
// - `df`, the filter gradient: the activated input recomputed band by band from the raw one, as
//   the forward pass computed it, instead of being kept in memory between the passes;
// - with `backward` (else only df): the input gradient at the activated input, `d_activated`,
//   of the rows each band completes, and BatchNorm's two backward sums over those rows, sum_g =
//   sum of d_activated * in_act'(z) and sum_gx = sum of d_activated * in_act'(z) * (x - mean),
//   z = x * in_scale + in_bias, while the band's raw rows and the rows just written are in L2.
//   The input-gradient and backward-sums kernels called one after the other read dy, x and
//   d_activated from memory again (docs/performance.md, sixteenth round, times both).
// Sums in float32 per image (the filter gradient) or tile of pixels (the BatchNorm sums), in double
// across.
struct NormBackward {
  const float* mean;  // (C): the batch mean the statistics were taken with.
  float* d_activated; // (N, H, W, C).
  float* sum_g;       // (C).
  float* sum_gx;      // (C).
};

// Adds the BatchNorm backward sums of `pixels` consecutive pixels of x and d_activated into the
// per-channel sums: float32 over a tile of pixels that stays in L1 while each block of 8 channels
// goes over it (at most 256 pixels, as batch_norm_cpu.cc's float32 runs), then double. (Channel
// blocks over a whole band, outermost, re-read it from L3.)
template <typename InActivation>
void AddNormSums(int64_t c, const float* x, const float* d_activated, int64_t pixels,
                 const Affine& in, InActivation in_act, const float* mean, double* sum_g,
                 double* sum_gx) {
  constexpr int64_t kTileValues = 2048;  // x's and d_activated's: 16 KB.
  const int64_t tile = std::max<int64_t>(1, kTileValues / c);
  for (int64_t p0 = 0; p0 < pixels; p0 += tile) {
    const int64_t end = std::min(pixels, p0 + tile) * c;
    for (int64_t cb = 0; cb < c; cb += kLanes) {
      const Vec8 scale = Load(in.scale + cb), bias = Load(in.bias + cb), m = Load(mean + cb);
      Vec8 g_sum = {}, gx_sum = {};
      for (int64_t p = p0 * c; p < end; p += c) {
        const Vec8 v = Load(x + p + cb);
        const Vec8 gated = in_act.Gate(v * scale + bias, Load(d_activated + p + cb));
        g_sum += gated;
        gx_sum += gated * (v - m);
      }
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        sum_g[cb + lane] += g_sum[lane];
        sum_gx[cb + lane] += gx_sum[lane];
      }
    }
  }
}

// The chunks' BatchNorm sums ([sum_g | sum_gx] per chunk, in double) into backward's outputs.
void StoreNormSums(const std::vector<double>& norm_sums, int64_t chunks, int64_t c,
                   const NormBackward& backward) {
  std::vector<float> both(2 * c);
  mobilenet::SumChunks(norm_sums, chunks, 2 * c, both.data());
  std::copy(both.begin(), both.begin() + c, backward.sum_g);
  std::copy(both.begin() + c, both.end(), backward.sum_gx);
}

// ActivatedBackward (below) on maps no larger than the filter (SmallMap): only the taps that land
// on the image, and images summed in float32 in groups of about as many products per tap as one
// 16x16 image has, then in double. (Per image, the band loop's float-to-double sum over all K*K*C
// taps cost more than the products: a 2x2 map has 4 outputs.)
template <int K, typename InActivation>
void ActivatedBackwardSmallMap(ffi::ThreadPool& pool, const Geometry& g, const float* x,
                               const float* dy, const float* f, const Affine& in,
                               InActivation in_act, float* df, const NormBackward* backward) {
  const int64_t taps = K * K * g.c, values = g.h * g.w * g.c;
  const int64_t group = std::max<int64_t>(1, 256 / (g.oh * g.ow));
  const int64_t chunks = mobilenet::NumChunks(pool, g.n);
  const std::optional<InputGradPlan> plan =
      backward ? std::optional<InputGradPlan>(PlanInputGrad(g, f)) : std::nullopt;
  std::vector<double> totals(chunks * taps, 0.0), norm_sums(chunks * 2 * g.c, 0.0);
  ForImages(pool, g.n, chunks, [&](int64_t lo, int64_t hi, int64_t t) {
    std::vector<float> activated(values);
    std::vector<float> sums(taps);
    double* total = totals.data() + t * taps;
    for (int64_t n0 = lo; n0 < hi; n0 += group) {
      std::fill(sums.begin(), sums.end(), 0.0f);
      for (int64_t n = n0; n < std::min(n0 + group, hi); ++n) {
        const float* image = x + n * values;
        if (backward) {
          float* d_image = backward->d_activated + n * values;
          InputGradRows(*plan, dy + n * g.oh * g.ow * g.c, d_image, 0, g.h);
          double* norm = norm_sums.data() + t * 2 * g.c;
          AddNormSums(g.c, image, d_image, g.h * g.w, in, in_act, backward->mean, norm, norm + g.c);
        }
        ActivateImage(g, image, in, in_act, activated.data());
        for (int64_t i = 0; i < g.oh; ++i) {
          const auto [a0, a1] = InsideTaps(i, g.sh, g.pt, K, g.h);
          for (int64_t j = 0; j < g.ow; ++j) {
            const auto [b0, b1] = InsideTaps(j, g.sw, g.pl, K, g.w);
            const float* corner =
                activated.data() + ((i * g.sh - g.pt) * g.w + j * g.sw - g.pl) * g.c;
            const float* grad = dy + ((n * g.oh + i) * g.ow + j) * g.c;
            for (int64_t a = a0; a < a1; ++a) {
              for (int64_t b = b0; b < b1; ++b) {
                const float* in_row = corner + (a * g.w + b) * g.c;
                float* sum = sums.data() + (a * K + b) * g.c;
                for (int64_t cb = 0; cb < g.c; cb += kLanes) {
                  Store(sum + cb, Load(sum + cb) + Load(in_row + cb) * Load(grad + cb));
                }
              }
            }
          }
        }
      }
      for (int64_t k = 0; k < taps; ++k) total[k] += sums[k];
    }
  });
  mobilenet::SumChunks(totals, chunks, taps, df);
  if (backward) StoreNormSums(norm_sums, chunks, g.c, *backward);
}

// K*K vector accumulators per channel block for the filter gradient, float32 per image, double
// across images, as FilterGradVectorized. A band's raw rows, their activated copy, its gradient
// rows and the input gradient's rows must all stay in L2 between the steps: the band is a
// quarter of InferenceForward's (docs/performance.md, sixteenth round).
constexpr int64_t kBackwardBandBytes = 128 * 1024;

template <int K, typename InActivation>
void ActivatedBackward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* dy,
                       const float* f, const Affine& in, InActivation in_act, float* df,
                       const NormBackward* backward) {
  if (SmallMap(g)) return ActivatedBackwardSmallMap<K>(pool, g, x, dy, f, in, in_act, df, backward);
  const Bands bands = MakeBands<K>(g, kBackwardBandBytes);
  const int64_t taps = K * K * g.c, values = g.h * g.w * g.c;
  const int64_t chunks = mobilenet::NumChunks(pool, g.n);
  const std::optional<InputGradPlan> plan =
      backward ? std::optional<InputGradPlan>(PlanInputGrad(g, f)) : std::nullopt;
  const bool by_rows = plan && InputGradByRows(*plan);
  std::vector<double> totals(chunks * taps, 0.0), norm_sums(chunks * 2 * g.c, 0.0);
  ForImages(pool, g.n, chunks, [&](int64_t lo, int64_t hi, int64_t t) {
    std::vector<float> activated(bands.band_rows * bands.row_values, 0.0f);
    std::vector<float> image_sums(taps);
    double* total = totals.data() + t * taps;
    double* norm = norm_sums.data() + t * 2 * g.c;
    for (int64_t n = lo; n < hi; ++n) {
      std::fill(image_sums.begin(), image_sums.end(), 0.0f);
      const float* image = x + n * values;
      float* d_image = backward ? backward->d_activated + n * values : nullptr;
      const float* grad_image = dy + n * g.oh * g.ow * g.c;
      if (backward && !by_rows) InputGradRows(*plan, grad_image, d_image, 0, g.h);
      int64_t done = 0;  // The image rows whose input gradient and BatchNorm sums are taken.
      for (int64_t first = 0; first < g.oh; first += bands.band_oh) {
        const int64_t rows_out = std::min(bands.band_oh, g.oh - first);
        ActivateBand<K>(g, bands, image, in, in_act, first, rows_out, activated.data());
        if (backward) {
          // The rows no later output row reads (their input gradient is whole), all of them
          // read by this band or the one before: their input gradient, then their sums, while
          // the raw rows and the gradient just written are in cache. A row no output reads
          // has no gradient and adds nothing.
          const int64_t last = first + rows_out == g.oh
                                   ? g.h : std::min(g.h, (first + rows_out) * g.sh - g.pt);
          if (last > done) {
            if (by_rows) InputGradRows(*plan, grad_image, d_image, done, last);
            AddNormSums(g.c, image + done * g.w * g.c, d_image + done * g.w * g.c,
                        (last - done) * g.w, in, in_act, backward->mean, norm, norm + g.c);
            done = last;
          }
        }
        for (int64_t cb = 0; cb < g.c; cb += kLanes) {
          Vec8 acc[K * K];
          for (int k = 0; k < K * K; ++k) acc[k] = Load(image_sums.data() + k * g.c + cb);
          for (int64_t i = 0; i < rows_out; ++i) {
            const float* window_rows = activated.data() + i * g.sh * bands.row_values + cb;
            const float* grad = dy + ((n * g.oh + first + i) * g.ow) * g.c + cb;
            for (int64_t j = 0; j < g.ow; ++j) {
              const Vec8 d = Load(grad + j * g.c);
              const float* window = window_rows + j * g.sw * g.c;
              for (int a = 0; a < K; ++a) {
                for (int b = 0; b < K; ++b) {
                  acc[a * K + b] += Load(window + a * bands.row_values + b * g.c) * d;
                }
              }
            }
          }
          for (int k = 0; k < K * K; ++k) Store(image_sums.data() + k * g.c + cb, acc[k]);
        }
      }
      for (int64_t k = 0; k < taps; ++k) total[k] += image_sums[k];
    }
  });
  mobilenet::SumChunks(totals, chunks, taps, df);
  if (backward) StoreNormSums(norm_sums, chunks, g.c, *backward);
}

// Filter gradient, K x K, channels a multiple of 8: K*K vector accumulators
// per channel block and image, in float32 per image, double across images.
template <int K>
void FilterGradVectorized(ffi::ThreadPool& pool, const Geometry& g, const float* x,
                          const float* dy, float* df) {
  const int64_t taps = K * K * g.c;
  const int64_t chunks = mobilenet::NumChunks(pool, g.n);
  const std::vector<float> zeros(g.w * g.c, 0.0f);
  const Columns interior = InteriorColumns(g.w, g.ow, g.sw, g.pl, K);
  std::vector<double> totals(chunks * taps, 0.0);
  ForImages(pool, g.n, chunks, [&](int64_t lo, int64_t hi, int64_t t) {
    double* total = totals.data() + t * taps;
    for (int64_t n = lo; n < hi; ++n) {
      for (int64_t cb = 0; cb < g.c; cb += kLanes) {
        Vec8 acc[K * K] = {};
        for (int64_t i = 0; i < g.oh; ++i) {
          const float* rows[K];
          InputRows<K>(g, x + n * g.h * g.w * g.c, zeros.data(), i, rows);
          const float* grad = dy + (n * g.oh + i) * g.ow * g.c + cb;
          ForColumns(interior, g.ow, [&](int64_t j, auto checked) {
            int64_t q0 = j * g.sw - g.pl;
            Vec8 d = Load(grad + j * g.c);
            for (int a = 0; a < K; ++a) {
              for (int b = 0; b < K; ++b) {
                if (checked && (q0 + b < 0 || q0 + b >= g.w)) continue;
                acc[a * K + b] += Load(rows[a] + (q0 + b) * g.c + cb) * d;
              }
            }
          });
        }
        for (int k = 0; k < K * K; ++k) {
          for (int64_t lane = 0; lane < kLanes; ++lane) total[k * g.c + cb + lane] += acc[k][lane];
        }
      }
    }
  });
  mobilenet::SumChunks(totals, chunks, taps, df);
}

// y[n,i,j,c] = sum_{a,b} x[n, i*sh+a-pt, j*sw+b-pl, c] * f[a,b,c]  (zero outside x).
void Forward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* f, float* y) {
  if (Vectorized(g)) {
    return WithFilterSize(g, [&](auto k) { ForwardVectorized<decltype(k)::value>(pool, g, x, f, y); });
  }
  ForImages(pool, g.n, mobilenet::NumChunks(pool, g.n), [&](int64_t lo, int64_t hi, int64_t) {
    for (int64_t n = lo; n < hi; ++n) {
      for (int64_t i = 0; i < g.oh; ++i) {
        for (int64_t j = 0; j < g.ow; ++j) {
          float* out = y + ((n * g.oh + i) * g.ow + j) * g.c;
          std::fill(out, out + g.c, 0.0f);
          for (int64_t a = 0; a < g.kh; ++a) {
            int64_t r = i * g.sh + a - g.pt;
            if (r < 0 || r >= g.h) continue;
            for (int64_t b = 0; b < g.kw; ++b) {
              int64_t q = j * g.sw + b - g.pl;
              if (q < 0 || q >= g.w) continue;
              const float* in = x + ((n * g.h + r) * g.w + q) * g.c;
              const float* tap = f + (a * g.kw + b) * g.c;
              for (int64_t c = 0; c < g.c; ++c) out[c] += in[c] * tap[c];
            }
          }
        }
      }
    }
  });
}

// df[a,b,c] = sum_{n,i,j} x[n, i*sh+a-pt, j*sw+b-pl, c] * dy[n,i,j,c].
// Each chunk sums its images in float32 per image, then in double across
// images, so long batches do not lose precision.
void FilterGrad(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* dy,
                float* df) {
  if (Vectorized(g)) {
    return WithFilterSize(g, [&](auto k) { FilterGradVectorized<decltype(k)::value>(pool, g, x, dy, df); });
  }
  int64_t taps = g.kh * g.kw * g.c;
  int64_t chunks = mobilenet::NumChunks(pool, g.n);
  std::vector<double> totals(chunks * taps, 0.0);
  ForImages(pool, g.n, chunks, [&](int64_t lo, int64_t hi, int64_t t) {
    std::vector<float> image(taps);
    double* total = totals.data() + t * taps;
    for (int64_t n = lo; n < hi; ++n) {
      std::fill(image.begin(), image.end(), 0.0f);
      for (int64_t i = 0; i < g.oh; ++i) {
        for (int64_t j = 0; j < g.ow; ++j) {
          const float* grad = dy + ((n * g.oh + i) * g.ow + j) * g.c;
          for (int64_t a = 0; a < g.kh; ++a) {
            int64_t r = i * g.sh + a - g.pt;
            if (r < 0 || r >= g.h) continue;
            for (int64_t b = 0; b < g.kw; ++b) {
              int64_t q = j * g.sw + b - g.pl;
              if (q < 0 || q >= g.w) continue;
              const float* in = x + ((n * g.h + r) * g.w + q) * g.c;
              float* acc = image.data() + (a * g.kw + b) * g.c;
              for (int64_t c = 0; c < g.c; ++c) acc[c] += in[c] * grad[c];
            }
          }
        }
      }
      for (int64_t k = 0; k < taps; ++k) total[k] += image[k];
    }
  });
  mobilenet::SumChunks(totals, chunks, taps, df);
}

// x: (N, H, W, C); f: (kh, kw, C); y: (N, OH, OW, C).
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> f,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  return Geometry{x[0], x[1], x[2], x[3], f[0], f[1], y[1], y[2], sh, sw, pt, pl};
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> f,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pl) {
  Forward(pool, MakeGeometry(x.dimensions(), f.dimensions(), y->dimensions(), sh, sw, pt, pl),
          x.typed_data(), f.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

// Checks the shape and activation kinds the fused kernels support.
ffi::Error CheckFused(const Geometry& g, std::initializer_list<int32_t> kinds) {
  if (!VectorizedShape(g)) {
    return ffi::Error::InvalidArgument("needs a 3x3 or 5x5 filter over a multiple of 8 channels");
  }
  for (int32_t kind : kinds) {
    if (kind != kClip && kind != kHardSwish) {
      return ffi::Error::InvalidArgument("unknown activation kind");
    }
  }
  return ffi::Error::Success();
}

// Calls body(K, in_act, out_act): the compile-time filter size of a vectorized geometry and the
// activations the two affine maps name, as the inference kernels are instantiated.
template <typename Body>
void WithInferenceInstance(const Geometry& g, const Affine& in, const Affine& out, Body body) {
  WithFilterSize(g, [&](auto k) {
    WithActivation(in, [&](auto in_act) {
      WithActivation(out, [&](auto out_act) { body(k, in_act, out_act); });
    });
  });
}

ffi::Error InferenceForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> f, ffi::Buffer<ffi::F32> in_scale,
                                ffi::Buffer<ffi::F32> in_bias, ffi::Buffer<ffi::F32> out_scale,
                                ffi::Buffer<ffi::F32> out_bias, ffi::ResultBuffer<ffi::F32> y,
                                int64_t sh, int64_t sw, int64_t pt, int64_t pl, int32_t in_kind,
                                float in_lo, float in_hi, int32_t out_kind, float out_lo,
                                float out_hi) {
  Geometry g = MakeGeometry(x.dimensions(), f.dimensions(), y->dimensions(), sh, sw, pt, pl);
  ffi::Error error = CheckFused(g, {in_kind, out_kind});
  if (error.failure()) return error;
  const Affine in{in_scale.typed_data(), in_bias.typed_data(), in_kind, in_lo, in_hi};
  const Affine out{out_scale.typed_data(), out_bias.typed_data(), out_kind, out_lo, out_hi};
  WithInferenceInstance(g, in, out, [&](auto k, auto in_act, auto out_act) {
    InferenceForward<decltype(k)::value>(pool, g, x.typed_data(), f.typed_data(), in, in_act, out,
                                         out_act, y->typed_data());
  });
  return ffi::Error::Success();
}

// x: (N, H, W, C), or the block input (N, H, W, c) with expand (c, C), or the images
// (N, H0, W0, c) with stem (kh, kw, c, C) and the stem's strides, low padding and output size
// (stem_oh, stem_ow) = (H, W); f: (K, K, C); the four affine vectors (C); w: (C, D), or empty to
// leave the projection out (then D = C); pw_scale, pw_bias (D) (empty without w); residual:
// (N, OH, OW, D) or empty; residual_from_input: add the depthwise layer's input instead (with the
// stem, stride 1, D = C); y: (N, OH, OW, D); mean: (N, C) (without w: y's mean over each image)
// or (N, 0).
ffi::Error SeparableInferenceImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> f, ffi::Buffer<ffi::F32> in_scale,
                                  ffi::Buffer<ffi::F32> in_bias, ffi::Buffer<ffi::F32> out_scale,
                                  ffi::Buffer<ffi::F32> out_bias, ffi::Buffer<ffi::F32> w,
                                  ffi::Buffer<ffi::F32> pw_scale, ffi::Buffer<ffi::F32> pw_bias,
                                  ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::F32> expand,
                                  ffi::Buffer<ffi::F32> stem, ffi::ResultBuffer<ffi::F32> y,
                                  ffi::ResultBuffer<ffi::F32> mean,
                                  int64_t sh, int64_t sw, int64_t pt, int64_t pl, int32_t in_kind,
                                  float in_lo, float in_hi, int32_t out_kind, float out_lo,
                                  float out_hi, int64_t stem_sh, int64_t stem_sw, int64_t stem_pt,
                                  int64_t stem_pl, int64_t stem_oh, int64_t stem_ow,
                                  int64_t residual_from_input) {
  Geometry g = MakeGeometry(x.dimensions(), f.dimensions(), y->dimensions(), sh, sw, pt, pl);
  const int64_t block_channels = g.c;
  const bool expanding = expand.element_count() != 0, projecting = w.element_count() != 0;
  const bool stemming = stem.element_count() != 0;
  g.c = f.dimensions().back();
  const mobilenet::convolution::Geometry stem_g{
      g.n, g.h, g.w, block_channels, stemming ? stem.dimensions()[0] : 0,
      stemming ? stem.dimensions()[1] : 0, g.c, stem_oh, stem_ow, stem_sh, stem_sw, stem_pt,
      stem_pl};
  if (stemming) g.h = stem_oh, g.w = stem_ow;
  ffi::Error error = CheckFused(g, {in_kind, out_kind});
  if (error.failure()) return error;
  const int64_t d = projecting ? w.dimensions().back() : g.c;
  const int64_t rows = g.n * g.oh * g.ow;
  if (d % kLanes != 0) return ffi::Error::InvalidArgument("output channels must be a multiple of 8");
  const bool input_shapes =
      expanding ? !stemming && expand.element_count() == block_channels * g.c
      : stemming ? stem.dimensions().size() == 4 && stem.dimensions()[2] == block_channels &&
                       stem.dimensions()[3] == g.c && stem_oh > 0 && stem_ow > 0
                 : block_channels == g.c;
  if (!input_shapes ||
      (projecting && (w.element_count() != g.c * d || pw_scale.element_count() != d ||
                      pw_bias.element_count() != d)) ||
      y->element_count() != rows * d ||
      (residual.element_count() != 0 && (!projecting || residual.element_count() != rows * d)) ||
      (residual_from_input && (!stemming || !projecting || residual.element_count() != 0 ||
                               d != g.c || g.oh != g.h || g.ow != g.w)) ||
      (mean->element_count() != 0 && (projecting || mean->element_count() != g.n * g.c))) {
    return ffi::Error::InvalidArgument(
        "shapes: x (N, H, W, C), or (N, H, W, c) with expand (c, C), or (N, H0, W0, c) with stem "
        "(kh, kw, c, C); w (C, D) or empty, pw_scale and pw_bias (D), residual (N, OH, OW, D) or "
        "empty (or residual_from_input, with the stem, D = C and OH, OW = H, W), y (N, OH, OW, D), "
        "mean (N, C) without w, or (N, 0)");
  }
  const Affine in{in_scale.typed_data(), in_bias.typed_data(), in_kind, in_lo, in_hi};
  const Affine out{out_scale.typed_data(), out_bias.typed_data(), out_kind, out_lo, out_hi};
  const mobilenet::pointwise::Epilogue pw{pw_scale.typed_data(), pw_bias.typed_data()};
  const float* res = residual.element_count() > 0 ? residual.typed_data() : nullptr;
  std::optional<mobilenet::convolution::PaddedImage> stem_image;
  if (stemming) stem_image.emplace(stem_g);
  const InputLayer input_layer{x.typed_data(),
                               stemming ? stem.typed_data() : expand.typed_data(), block_channels,
                               stemming ? &stem_g : nullptr,
                               stemming ? &*stem_image : nullptr};
  WithInferenceInstance(g, in, out, [&](auto k, auto in_act, auto out_act) {
    SeparableInference<decltype(k)::value>(
        pool, g, x.typed_data(), f.typed_data(), in, in_act, out, out_act,
        expanding || stemming ? &input_layer : nullptr, projecting ? w.typed_data() : nullptr, d,
        pw, res, residual_from_input != 0, y->typed_data(),
        mean->element_count() != 0 ? mean->typed_data() : nullptr);
  });
  return ffi::Error::Success();
}

// x: (N, H, W, C); dy: (N, OH, OW, C); f: (K, K, C); in_scale, in_bias, mean: (C); df: (K, K, C);
// d_activated: (N, H, W, C), sum_g and sum_gx: (C), or all three empty for the filter gradient
// alone.
ffi::Error ActivatedBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> f,
                                 ffi::Buffer<ffi::F32> in_scale, ffi::Buffer<ffi::F32> in_bias,
                                 ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> df,
                                 ffi::ResultBuffer<ffi::F32> d_activated,
                                 ffi::ResultBuffer<ffi::F32> sum_g,
                                 ffi::ResultBuffer<ffi::F32> sum_gx, int64_t sh, int64_t sw,
                                 int64_t pt, int64_t pl, int32_t in_kind, float in_lo,
                                 float in_hi) {
  Geometry g = MakeGeometry(x.dimensions(), df->dimensions(), dy.dimensions(), sh, sw, pt, pl);
  ffi::Error error = CheckFused(g, {in_kind});
  if (error.failure()) return error;
  const size_t c = g.c;
  const bool with_backward = sum_g->element_count() != 0;
  if (f.element_count() != df->element_count() || in_scale.element_count() != c ||
      dy.element_count() != static_cast<size_t>(g.n * g.oh * g.ow * g.c) ||
      in_bias.element_count() != c || mean.element_count() != c ||
      d_activated->element_count() != (with_backward ? x.element_count() : 0) ||
      sum_gx->element_count() != sum_g->element_count() ||
      (with_backward && sum_g->element_count() != c)) {
    return ffi::Error::InvalidArgument("operand or result sizes do not fit the geometry");
  }
  const Affine in{in_scale.typed_data(), in_bias.typed_data(), in_kind, in_lo, in_hi};
  const NormBackward backward{mean.typed_data(), d_activated->typed_data(), sum_g->typed_data(),
                              sum_gx->typed_data()};
  WithFilterSize(g, [&](auto k) {
    WithActivation(in, [&](auto in_act) {
      ActivatedBackward<decltype(k)::value>(pool, g, x.typed_data(), dy.typed_data(),
                                            f.typed_data(), in, in_act, df->typed_data(),
                                            with_backward ? &backward : nullptr);
    });
  });
  return ffi::Error::Success();
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> f,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                         int64_t pl) {
  InputGrad(pool, MakeGeometry(dx->dimensions(), f.dimensions(), dy.dimensions(), sh, sw, pt, pl),
            dy.typed_data(), f.typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

ffi::Error FilterGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> df, int64_t sh, int64_t sw, int64_t pt,
                          int64_t pl) {
  FilterGrad(pool, MakeGeometry(x.dimensions(), df->dimensions(), dy.dimensions(), sh, sw, pt, pl),
             x.typed_data(), dy.typed_data(), df->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// Every kernel: two float32 operands, one float32 result, strides and low padding.
#define DEPTHWISE_BINDING                                                         \
  ffi::Ffi::Bind()                                                                \
      .Ctx<ffi::ThreadPool>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                               \
      .Arg<ffi::Buffer<ffi::F32>>()                                               \
      .Ret<ffi::Buffer<ffi::F32>>()                                               \
      .Attr<int64_t>("sh")                                                        \
      .Attr<int64_t>("sw")                                                        \
      .Attr<int64_t>("pt")                                                        \
      .Attr<int64_t>("pl")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseForward, ForwardImpl, DEPTHWISE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseInputGrad, InputGradImpl, DEPTHWISE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseFilterGrad, FilterGradImpl, DEPTHWISE_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseInferenceForward, InferenceForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int32_t>("in_kind")
                                  .Attr<float>("in_lo")
                                  .Attr<float>("in_hi")
                                  .Attr<int32_t>("out_kind")
                                  .Attr<float>("out_lo")
                                  .Attr<float>("out_hi"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeparableInferenceForward, SeparableInferenceImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // f
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pw_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pw_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual
                                  .Arg<ffi::Buffer<ffi::F32>>()  // expand
                                  .Arg<ffi::Buffer<ffi::F32>>()  // stem
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int32_t>("in_kind")
                                  .Attr<float>("in_lo")
                                  .Attr<float>("in_hi")
                                  .Attr<int32_t>("out_kind")
                                  .Attr<float>("out_lo")
                                  .Attr<float>("out_hi")
                                  .Attr<int64_t>("stem_sh")
                                  .Attr<int64_t>("stem_sw")
                                  .Attr<int64_t>("stem_pt")
                                  .Attr<int64_t>("stem_pl")
                                  .Attr<int64_t>("stem_oh")
                                  .Attr<int64_t>("stem_ow")
                                  .Attr<int64_t>("residual_from_input"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseActivatedBackward, ActivatedBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // f
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // df
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_activated
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum_g
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum_gx
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int32_t>("in_kind")
                                  .Attr<float>("in_lo")
                                  .Attr<float>("in_hi"));
