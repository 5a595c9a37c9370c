// BatchNorm + clipped-linear activation (ReLU, ReLU6 or none) for XLA:CPU, via jax.ffi.
//
// XLA:CPU runs the elementwise loops of BatchNorm's forward and backward
// passes 10-20x below memory bandwidth on channels-minor activations (the
// per-channel broadcasts defeat its vectorizer), and BatchNorm took about 40%
// of a training step. These loops read the (rows, channels) activations with
// channels innermost, so they vectorize, and each makes one pass.
//
// The activation is clip(z, lo, hi) with z = x * a + b: ReLU is lo = 0,
// hi = +inf; ReLU6 is lo = 0, hi = 6; none is lo = -inf, hi = +inf. Its
// derivative is 1 strictly inside (lo, hi) and 0 elsewhere, as jax.nn.relu's
// and jax.nn.relu6's. Sums are float32 within a chunk of rows and double
// across chunks.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_loops.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rows of float32 accumulation before a chunk's partial sums go to double.
constexpr int64_t kBlockRows = 256;

int64_t Channels(const ffi::Buffer<ffi::F32>& x) {
  auto dims = x.dimensions();
  return dims.size() == 0 ? 1 : dims.back();
}

// Two per-channel sums over all rows, in parallel: term(first, last, s0, s1)
// adds rows [first, last) into the float32 accumulators s0[C] and s1[C].
template <typename Term>
void ColumnSums(ffi::ThreadPool& pool, int64_t rows, int64_t c, Term term,
                std::vector<double>& out0, std::vector<double>& out1) {
  int64_t chunks = mobilenet::NumChunks(pool, rows);
  std::vector<double> partial(chunks * 2 * c, 0.0);
  mobilenet::ParallelFor(pool, rows, chunks, [&](int64_t chunk, int64_t lo, int64_t hi) {
    double* p0 = partial.data() + chunk * 2 * c;
    double* p1 = p0 + c;
    std::vector<float> s0(c), s1(c);
    for (int64_t start = lo; start < hi; start += kBlockRows) {
      std::fill(s0.begin(), s0.end(), 0.0f);
      std::fill(s1.begin(), s1.end(), 0.0f);
      int64_t stop = std::min(hi, start + kBlockRows);
      term(start, stop, s0.data(), s1.data());
      for (int64_t k = 0; k < c; ++k) {
        p0[k] += s0[k];
        p1[k] += s1[k];
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

// The loops proper, with restrict-qualified pointers so that GCC vectorizes them.
void SumAndSquares(const float* __restrict x, int64_t rows, int64_t c, float* __restrict s0,
                   float* __restrict s1) {
  for (int64_t r = 0; r < rows; ++r, x += c) {
    for (int64_t k = 0; k < c; ++k) {
      s0[k] += x[k];
      s1[k] += x[k] * x[k];
    }
  }
}

void GradientSums(const float* __restrict x, const float* __restrict dy, const float* __restrict a,
                  const float* __restrict b, const float* __restrict mean, int64_t rows, int64_t c,
                  float lo, float hi, float* __restrict s0, float* __restrict s1) {
  for (int64_t r = 0; r < rows; ++r, x += c, dy += c) {
    for (int64_t k = 0; k < c; ++k) {
      float d = dy[k];  // Loaded unconditionally so that the select vectorizes.
      float z = x[k] * a[k] + b[k];
      float g = (z > lo) & (z < hi) ? d : 0.0f;
      s0[k] += g;
      s1[k] += g * (x[k] - mean[k]);
    }
  }
}

// mean[C] and biased variance[C] (clipped at 0) of x over all rows.
ffi::Error StatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                     ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var) {
  int64_t c = Channels(x), rows = x.element_count() / c;
  const float* in = x.typed_data();
  std::vector<double> sum, sum_sq;
  ColumnSums(pool, rows, c, [&](int64_t first, int64_t last, float* s0, float* s1) {
    SumAndSquares(in + first * c, last - first, c, s0, s1);
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
                     ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, float lo, float hi) {
  int64_t c = Channels(x), rows = x.element_count() / c;
  const float *in = x.typed_data(), *pa = a.typed_data(), *pb = b.typed_data();
  float* out = y->typed_data();
  mobilenet::ParallelFor(pool, rows, mobilenet::NumChunks(pool, rows),
                         [&](int64_t, int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* row = in + r * c;
      float* out_row = out + r * c;
      for (int64_t k = 0; k < c; ++k) out_row[k] = std::min(std::max(row[k] * pa[k] + pb[k], lo), hi);
    }
  });
  return ffi::Error::Success();
}

// With g = dy where lo < x * a + b < hi (else 0): sum_g[C] = sum g and
// sum_gx[C] = sum g * (x - mean).
ffi::Error BackwardSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> a,
                            ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> sum_g, ffi::ResultBuffer<ffi::F32> sum_gx,
                            float lo, float hi) {
  int64_t c = Channels(x), rows = x.element_count() / c;
  const float *in = x.typed_data(), *grad = dy.typed_data(), *pa = a.typed_data(),
              *pb = b.typed_data(), *pm = mean.typed_data();
  std::vector<double> s_g, s_gx;
  ColumnSums(pool, rows, c, [&](int64_t first, int64_t last, float* s0, float* s1) {
    GradientSums(in + first * c, grad + first * c, pa, pb, pm, last - first, c, lo, hi, s0, s1);
  }, s_g, s_gx);
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
                             ffi::Buffer<ffi::F32> k0, ffi::ResultBuffer<ffi::F32> dx, float lo,
                             float hi) {
  int64_t c = Channels(x), rows = x.element_count() / c;
  const float *in = x.typed_data(), *grad = dy.typed_data(), *pa = a.typed_data(),
              *pb = b.typed_data(), *p1 = k1.typed_data(), *p0 = k0.typed_data();
  float* out = dx->typed_data();
  mobilenet::ParallelFor(pool, rows, mobilenet::NumChunks(pool, rows),
                         [&](int64_t, int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* row = in + r * c;
      const float* grad_row = grad + r * c;
      float* out_row = out + r * c;
      for (int64_t k = 0; k < c; ++k) {
        float d = grad_row[k];
        float z = row[k] * pa[k] + pb[k];
        float g = (z > lo) & (z < hi) ? d : 0.0f;
        out_row[k] = pa[k] * g + p1[k] * row[k] + p0[k];
      }
    }
  });
  return ffi::Error::Success();
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
                                  .Attr<float>("lo")
                                  .Attr<float>("hi"));
