// Splitting a C++ kernel's loop across XLA:CPU's own intra-op thread pool.
//
// The kernels run inside an XLA:CPU program whose worker threads already own
// the cores; starting threads of our own would compete with them. Instead the
// calling thread and pool tasks take chunks of the work from a shared counter
// until none is left, so the call finishes even when no pool thread is free
// (the caller then does every chunk itself) and never waits for a task that
// has not started. Tasks that start late find no chunk and touch nothing but
// the shared counter, which they co-own.

#ifndef MOBILENET_CPU_LOOPS_H_
#define MOBILENET_CPU_LOOPS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace mobilenet {

// How many chunks to cut `n` items into for `pool` (at least 1, at most n).
inline int64_t NumChunks(xla::ffi::ThreadPool& pool, int64_t n) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(n, threads));
}

// Calls body(chunk, lo, hi) for chunk = 0 .. chunks-1 over [0, n), in parallel.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunks, const Body& body) {
  if (chunks <= 1) {
    body(0, 0, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto shared = std::make_shared<Shared>();
  // Only ever called for a chunk claimed before `finished` reached `chunks`,
  // i.e. while the caller is still waiting, so `body` is alive.
  auto run_chunks = [shared, chunks, n, &body] {
    for (int64_t chunk; (chunk = shared->next.fetch_add(1)) < chunks;) {
      body(chunk, n * chunk / chunks, n * (chunk + 1) / chunks);
      shared->finished.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t task = 1; task < chunks; ++task) pool.Schedule([run_chunks] { run_chunks(); });
  run_chunks();
  while (shared->finished.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// out[k] = the sum over chunks of partial[chunk * size + k], in double and in
// chunk order (so the result does not depend on which thread ran which chunk).
inline void SumChunks(const std::vector<double>& partial, int64_t chunks, int64_t size, float* out) {
  for (int64_t k = 0; k < size; ++k) {
    double sum = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * size + k];
    out[k] = static_cast<float>(sum);
  }
}

}  // namespace mobilenet

#endif  // MOBILENET_CPU_LOOPS_H_
