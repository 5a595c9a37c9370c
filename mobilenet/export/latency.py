"""Single-image latency of an exported model (.tflite or .onnx) on the CPU.

`measure(path)` loads the model once per thread count, runs `warmup`
untimed calls, then times `runs` calls of one image each and reports the
median (robust to the other jobs of a shared machine) and the 10th / 90th
percentiles, in milliseconds: on 1 thread and on all the machine's cores.
"""
import dataclasses
import os
import time

import numpy as np

from mobilenet.export import runtime


@dataclasses.dataclass
class Latency:
  """One model on one thread count."""
  path: str
  threads: int
  median_ms: float
  p10_ms: float
  p90_ms: float
  runs: int


def _time_calls(predictor: runtime.Predictor, runs: int, warmup: int) -> np.ndarray:
  image = np.random.default_rng(0).normal(size=predictor.input_shape).astype(np.float32)
  for _ in range(warmup):
    predictor.run_one(image)
  seconds = np.empty(runs)
  for i in range(runs):
    start = time.perf_counter()
    predictor.run_one(image)
    seconds[i] = time.perf_counter() - start
  return seconds * 1e3


def measure(path: str, threads: tuple[int, ...] | None = None, runs: int = 200,
            warmup: int = 20) -> list[Latency]:
  """Latency of one image on each thread count (default: 1 and all cores)."""
  threads = threads or tuple(sorted({1, os.cpu_count() or 1}))
  results = []
  for count in threads:
    times = _time_calls(runtime.load(path, num_threads=count), runs, warmup)
    results.append(Latency(path=path, threads=count, median_ms=float(np.median(times)),
                           p10_ms=float(np.percentile(times, 10)),
                           p90_ms=float(np.percentile(times, 90)), runs=runs))
  return results
