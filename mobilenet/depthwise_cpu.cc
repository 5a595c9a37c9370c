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

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_loops.h"
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

// y[n,i,j,c] = sum_{a,b} x[n, i*sh+a-pt, j*sw+b-pl, c] * f[a,b,c]  (zero outside x).
void Forward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* f, float* y) {
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

// dx[n,r,q,c] = sum over the (i,j,a,b) that read (r,q) of dy[n,i,j,c] * f[a,b,c].
void InputGrad(ffi::ThreadPool& pool, const Geometry& g, const float* dy, const float* f,
               float* dx) {
  ForImages(pool, g.n, mobilenet::NumChunks(pool, g.n), [&](int64_t lo, int64_t hi, int64_t) {
    std::memset(dx + lo * g.h * g.w * g.c, 0, sizeof(float) * (hi - lo) * g.h * g.w * g.c);
    for (int64_t n = lo; n < hi; ++n) {
      for (int64_t i = 0; i < g.oh; ++i) {
        for (int64_t j = 0; j < g.ow; ++j) {
          const float* grad = dy + ((n * g.oh + i) * g.ow + j) * g.c;
          for (int64_t a = 0; a < g.kh; ++a) {
            int64_t r = i * g.sh + a - g.pt;
            if (r < 0 || r >= g.h) continue;
            for (int64_t b = 0; b < g.kw; ++b) {
              int64_t q = j * g.sw + b - g.pl;
              if (q < 0 || q >= g.w) continue;
              float* out = dx + ((n * g.h + r) * g.w + q) * g.c;
              const float* tap = f + (a * g.kw + b) * g.c;
              for (int64_t c = 0; c < g.c; ++c) out[c] += grad[c] * tap[c];
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
  for (int64_t k = 0; k < taps; ++k) {
    double sum = 0.0;
    for (int64_t t = 0; t < chunks; ++t) sum += totals[t * taps + k];
    df[k] = static_cast<float>(sum);
  }
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
