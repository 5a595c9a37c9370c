// BatchNorm + activation (ReLU, ReLU6, none or hard-swish) for XLA:CPU, via jax.ffi.
//
// XLA:CPU runs the elementwise loops of BatchNorm's forward and backward
// passes 10-20x below memory bandwidth on channels-minor activations (the
// per-channel broadcasts defeat its vectorizer), and BatchNorm took about 40%
// of a training step. These loops read the (rows, channels) activations with
// channels innermost, so they vectorize, and each makes one pass.
//
// The activation of z = x * a + b is chosen by the `activation` attribute:
// kClip is clip(z, lo, hi) (ReLU is lo = 0, hi = +inf; ReLU6 is lo = 0,
// hi = 6; none is lo = -inf, hi = +inf), whose derivative is 1 strictly inside
// (lo, hi) and 0 elsewhere, as jax.nn.relu's and jax.nn.relu6's; kHardSwish is
// MobileNetV3's z * relu6(z + 3) / 6, whose derivative is 0 up to -3, 1 from
// 3 and z / 3 + 1/2 between, as jax.nn.hard_swish's. Sums are float32 within
// a chunk of rows and double across chunks.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_loops.h"
#include "cpu_vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rows of float32 accumulation before a chunk's partial sums go to double.
constexpr int64_t kBlockRows = 256;

// Every loop runs over flat spans of whole rows, at least kSpanValues values
// long, with the per-channel parameters tiled to the span's length: a loop
// per row of 8-32 channels spent more on its own overhead (and GCC's alias
// checks) than on the arithmetic.
constexpr int64_t kSpanValues = 512;

int64_t Channels(const ffi::Buffer<ffi::F32>& x) {
  auto dims = x.dimensions();
  return dims.size() == 0 ? 1 : dims.back();
}

int64_t RowsPerSpan(int64_t c) { return std::max<int64_t>(1, kSpanValues / c); }

// p[0 .. c) repeated `rows` times.
std::vector<float> Tiled(const float* p, int64_t c, int64_t rows) {
  std::vector<float> tiled(rows * c);
  for (int64_t r = 0; r < rows; ++r) std::copy(p, p + c, tiled.data() + r * c);
  return tiled;
}

// Calls span(first_row, num_rows) on consecutive spans of `per_span` rows
// (the last may be shorter) covering [lo, hi).
template <typename Span>
void ForSpans(int64_t lo, int64_t hi, int64_t per_span, Span span) {
  for (int64_t first = lo; first < hi; first += per_span) span(first, std::min(per_span, hi - first));
}

// Spans of all rows, in parallel over XLA's thread pool.
template <typename Span>
void ParallelSpans(ffi::ThreadPool& pool, int64_t rows, int64_t per_span, Span span) {
  int64_t spans = (rows + per_span - 1) / per_span;
  mobilenet::ParallelFor(pool, spans, mobilenet::NumChunks(pool, spans),
                         [&](int64_t, int64_t lo, int64_t hi) {
    ForSpans(lo * per_span, std::min(hi * per_span, rows), per_span, span);
  });
}

// Two per-channel sums over all rows, in parallel: term(first, num_rows, s0, s1)
// adds a span of rows into the float32 accumulators s0 and s1 (one value per
// position of a span, folded per channel afterwards).
template <typename Term>
void ColumnSums(ffi::ThreadPool& pool, int64_t rows, int64_t c, Term term,
                std::vector<double>& out0, std::vector<double>& out1) {
  const int64_t per_span = RowsPerSpan(c), width = per_span * c;
  const int64_t block = per_span * std::max<int64_t>(1, kBlockRows / per_span);
  int64_t chunks = mobilenet::NumChunks(pool, rows);
  std::vector<double> partial(chunks * 2 * c, 0.0);
  mobilenet::ParallelFor(pool, rows, chunks, [&](int64_t chunk, int64_t lo, int64_t hi) {
    double* p0 = partial.data() + chunk * 2 * c;
    double* p1 = p0 + c;
    std::vector<float> s0(width), s1(width);
    for (int64_t start = lo; start < hi; start += block) {
      std::fill(s0.begin(), s0.end(), 0.0f);
      std::fill(s1.begin(), s1.end(), 0.0f);
      ForSpans(start, std::min(hi, start + block), per_span,
               [&](int64_t first, int64_t n) { term(first, n, s0.data(), s1.data()); });
      for (int64_t k = 0; k < width; ++k) {
        p0[k % c] += s0[k];
        p1[k % c] += s1[k];
      }
    }
  });
  out0.assign(c, 0.0);
  out1.assign(c, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t k = 0; k < c; ++k) {
      out0[k] += partial[chunk * 2 * c + k];
      out1[k] += partial[chunk * 2 * c + c + k];
    }
  }
}

// The activations, as small structs the loops below are instantiated with
// (a runtime switch inside the loops would stop GCC from vectorizing them).
using mobilenet::kClip;
using mobilenet::kHardSwish;

struct Clip {
  float lo, hi;
  float Apply(float z) const { return std::min(std::max(z, lo), hi); }
  // d * activation'(z); d is loaded unconditionally so that the select vectorizes.
  float Gate(float z, float d) const { return (z > lo) & (z < hi) ? d : 0.0f; }
};

struct HardSwish {
  float Apply(float z) const { return z * std::min(std::max(z + 3.0f, 0.0f), 6.0f) * (1.0f / 6.0f); }
  float Gate(float z, float d) const {
    float slope = z * (1.0f / 3.0f) + 0.5f;
    slope = z <= -3.0f ? 0.0f : slope;
    return (z >= 3.0f ? 1.0f : slope) * d;
  }
};

// Runs body(activation) with the activation the attributes name.
template <typename Body>
ffi::Error WithActivation(int32_t kind, float lo, float hi, Body body) {
  if (kind == kClip) return body(Clip{lo, hi});
  if (kind == kHardSwish) return body(HardSwish{});
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "unknown batch-norm activation kind");
}

// The loops proper, over a flat span of `len` values, with restrict-qualified
// pointers so that GCC vectorizes them.
void SumAndSquares(const float* __restrict x, int64_t len, float* __restrict s0,
                   float* __restrict s1) {
  for (int64_t k = 0; k < len; ++k) {
    s0[k] += x[k];
    s1[k] += x[k] * x[k];
  }
}

template <typename Activation>
void GradientSums(const float* __restrict x, const float* __restrict dy, const float* __restrict a,
                  const float* __restrict b, const float* __restrict mean, int64_t len,
                  Activation act, float* __restrict s0, float* __restrict s1) {
  for (int64_t k = 0; k < len; ++k) {
    float g = act.Gate(x[k] * a[k] + b[k], dy[k]);
    s0[k] += g;
    s1[k] += g * (x[k] - mean[k]);
  }
}

template <typename Activation>
void Normalize(const float* __restrict x, const float* __restrict a, const float* __restrict b,
               int64_t len, Activation act, float* __restrict y) {
  for (int64_t k = 0; k < len; ++k) y[k] = act.Apply(x[k] * a[k] + b[k]);
}

template <typename Activation>
void InputGradient(const float* __restrict x, const float* __restrict dy,
                   const float* __restrict a, const float* __restrict b,
                   const float* __restrict k1, const float* __restrict k0, int64_t len,
                   Activation act, float* __restrict dx) {
  for (int64_t k = 0; k < len; ++k) {
    float g = act.Gate(x[k] * a[k] + b[k], dy[k]);
    dx[k] = a[k] * g + k1[k] * x[k] + k0[k];
  }
}

// mean[C] and biased variance[C] (clipped at 0) of x over all rows.
ffi::Error StatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                     ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var) {
  int64_t c = Channels(x), rows = x.element_count() / c;
  const float* in = x.typed_data();
  std::vector<double> sum, sum_sq;
  ColumnSums(pool, rows, c, [&](int64_t first, int64_t n, float* s0, float* s1) {
    SumAndSquares(in + first * c, n * c, s0, s1);
  }, sum, sum_sq);
  for (int64_t k = 0; k < c; ++k) {
    double m = sum[k] / rows;
    mean->typed_data()[k] = static_cast<float>(m);
    var->typed_data()[k] = static_cast<float>(std::max(sum_sq[k] / rows - m * m, 0.0));
  }
  return ffi::Error::Success();
}

// y = clip(x * a + b, lo, hi).
ffi::Error ApplyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                     ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int32_t activation,
                     float lo, float hi) {
  int64_t c = Channels(x), rows = x.element_count() / c, per_span = RowsPerSpan(c);
  const std::vector<float> ta = Tiled(a.typed_data(), c, per_span),
                           tb = Tiled(b.typed_data(), c, per_span);
  const float* in = x.typed_data();
  float* out = y->typed_data();
  return WithActivation(activation, lo, hi, [&](auto act) {
    ParallelSpans(pool, rows, per_span, [&](int64_t first, int64_t n) {
      Normalize(in + first * c, ta.data(), tb.data(), n * c, act, out + first * c);
    });
    return ffi::Error::Success();
  });
}

// With g = dy where lo < x * a + b < hi (else 0): sum_g[C] = sum g and
// sum_gx[C] = sum g * (x - mean).
ffi::Error BackwardSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> a,
                            ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> sum_g, ffi::ResultBuffer<ffi::F32> sum_gx,
                            int32_t activation, float lo, float hi) {
  int64_t c = Channels(x), rows = x.element_count() / c, per_span = RowsPerSpan(c);
  const std::vector<float> ta = Tiled(a.typed_data(), c, per_span),
                           tb = Tiled(b.typed_data(), c, per_span),
                           tm = Tiled(mean.typed_data(), c, per_span);
  const float *in = x.typed_data(), *grad = dy.typed_data();
  std::vector<double> s_g, s_gx;
  ffi::Error error = WithActivation(activation, lo, hi, [&](auto act) {
    ColumnSums(pool, rows, c, [&](int64_t first, int64_t n, float* s0, float* s1) {
      GradientSums(in + first * c, grad + first * c, ta.data(), tb.data(), tm.data(), n * c, act,
                   s0, s1);
    }, s_g, s_gx);
    return ffi::Error::Success();
  });
  if (error.failure()) return error;
  for (int64_t k = 0; k < c; ++k) {
    sum_g->typed_data()[k] = static_cast<float>(s_g[k]);
    sum_gx->typed_data()[k] = static_cast<float>(s_gx[k]);
  }
  return ffi::Error::Success();
}

// dx = a * g + k1 * x + k0, with g as in BackwardSums.
ffi::Error BackwardInputImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> a,
                             ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> k1,
                             ffi::Buffer<ffi::F32> k0, ffi::ResultBuffer<ffi::F32> dx,
                             int32_t activation, float lo, float hi) {
  int64_t c = Channels(x), rows = x.element_count() / c, per_span = RowsPerSpan(c);
  const std::vector<float> ta = Tiled(a.typed_data(), c, per_span),
                           tb = Tiled(b.typed_data(), c, per_span),
                           t1 = Tiled(k1.typed_data(), c, per_span),
                           t0 = Tiled(k0.typed_data(), c, per_span);
  const float *in = x.typed_data(), *grad = dy.typed_data();
  float* out = dx->typed_data();
  return WithActivation(activation, lo, hi, [&](auto act) {
    ParallelSpans(pool, rows, per_span, [&](int64_t first, int64_t n) {
      InputGradient(in + first * c, grad + first * c, ta.data(), tb.data(), t1.data(), t0.data(),
                    n * c, act, out + first * c);
    });
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormStats, StatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormApply, ApplyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("activation")
                                  .Attr<float>("lo")
                                  .Attr<float>("hi"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormBackwardSums, BackwardSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("activation")
                                  .Attr<float>("lo")
                                  .Attr<float>("hi"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormBackwardInput, BackwardInputImpl,
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
