"""What each inference fusion brings: the model's forward pass six ways, timed in one process.

For a config's model on a synthetic batch of its shape this compiles

- 'layer_by_layer': `model.apply(..., train=False)`, every layer as the model defines it;
- 'fused_two_kernels': models/fused_inference.py with `separable=False`: the BatchNorms
  inside the C++ depthwise and pointwise kernels, each layer a call of its own;
- 'fused_expansion_apart': 'fused' with every inverted residual block's expansion a product
  of its own;
- 'fused_stem_apart': 'fused' with the stem a kernel call of its own;
- 'fused_pooling_apart': 'fused' with squeeze-and-excitation's pooling XLA's mean over the
  depthwise output (the kernel's own sums unused);
- 'fused': a depthwise layer and the 1x1 product after it in one kernel (ops/separable.py), with
  the expansion before it, in the first block the stem, and squeeze-and-excitation's pooling
  summed as the depthwise output is written, what evaluation runs with
  `config.model.fused_inference`;

and calls them in turn, round after round, for `seconds`: each round's six calls meet the
same machine, so the paired ratios hold where this machine's speed drifts between runs
(10-30% on the shared 2-core VMs of docs/performance.md). Reports each path's median
milliseconds per batch, the median of the per-round speed-ups of 'fused' over
'fused_two_kernels', over 'fused_expansion_apart' ('expansion_speedup'), over
'fused_stem_apart' ('stem_speedup') and over 'fused_pooling_apart' ('pooling_speedup').
"""
import statistics
import time
from typing import Any, Callable, Dict

import jax
import ml_collections

from mobilenet.bench import benchmark
from mobilenet.models import fused_inference
from mobilenet.models import mobilenet as model_lib

PATHS = ('layer_by_layer', 'fused_two_kernels', 'fused_expansion_apart', 'fused_stem_apart',
         'fused_pooling_apart', 'fused')


def _forward_passes(model) -> Dict[str, Callable]:
  passes = {'layer_by_layer': lambda variables, images: model.apply(variables, images, train=False),
            'fused_two_kernels': fused_inference.inference_fn(model, separable=False),
            'fused_expansion_apart': fused_inference.inference_fn(model, expansion=False),
            'fused_stem_apart': fused_inference.inference_fn(model, stem=False),
            'fused_pooling_apart': fused_inference.inference_fn(model, pooling=False),
            'fused': fused_inference.inference_fn(model)}
  if passes['fused'] is None:
    raise ValueError(f'fused inference cannot compute this model: '
                     f'{fused_inference.unsupported_reason(model)}')
  return passes


def compare(config: ml_collections.ConfigDict, seconds: float = 10.0) -> Dict[str, Any]:
  """The six paths' median ms per batch and median paired speed-ups, for `config`'s model."""
  model = model_lib.create_model(config.model)
  images = benchmark.synthetic_batch(config)['image']
  variables = jax.jit(model.init)(jax.random.key(config.seed), images)
  compiled = {name: jax.jit(fn).lower(variables, images).compile()
              for name, fn in _forward_passes(model).items()}
  for fn in compiled.values():  # Warm-up: the kernels' buffers, the thread pool.
    for _ in range(2):
      jax.block_until_ready(fn(variables, images))
  times = {name: [] for name in PATHS}
  end = time.perf_counter() + seconds
  while time.perf_counter() < end or not times['fused']:
    for name in PATHS:
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](variables, images))
      times[name].append(time.perf_counter() - start)
  baseline = times['fused_two_kernels']
  speedup = lambda before, after: round(
      statistics.median(b / t for b, t in zip(times[before], times[after])), 3)
  return {
      'architecture': config.model.name, 'width_multiplier': config.model.width_multiplier,
      'resolution': config.model.resolution, 'batch_size': config.batch_size,
      'rounds': len(baseline),
      **{f'{name}_ms': round(1e3 * statistics.median(times[name]), 2) for name in PATHS},
      **{f'{name}_speedup': speedup('fused_two_kernels', name)
         for name in ('layer_by_layer', 'fused')},
      'expansion_speedup': speedup('fused_expansion_apart', 'fused'),
      'stem_speedup': speedup('fused_stem_apart', 'fused'),
      'pooling_speedup': speedup('fused_pooling_apart', 'fused'),
  }


def format_row(row: Dict[str, Any]) -> str:
  return (f"{row['architecture']:<34} {row['width_multiplier']:>5} {row['resolution']:>4} "
          f"{row['batch_size']:>5} {row['layer_by_layer_ms']:>10.2f} "
          f"{row['fused_two_kernels_ms']:>10.2f} {row['fused_expansion_apart_ms']:>10.2f} "
          f"{row['fused_stem_apart_ms']:>10.2f} {row['fused_pooling_apart_ms']:>10.2f} "
          f"{row['fused_ms']:>10.2f} {row['fused_speedup']:>8.3f} "
          f"{row['expansion_speedup']:>9.3f} {row['stem_speedup']:>7.3f} "
          f"{row['pooling_speedup']:>7.3f} {row['rounds']:>6}")


HEADER = (f"{'architecture':<34} {'alpha':>5} {'res':>4} {'batch':>5} {'layers ms':>10} "
          f"{'2-kernel ms':>10} {'exp. apart':>10} {'stem apart':>10} {'pool apart':>10} "
          f"{'fused ms':>10} {'speedup':>8} {'expansion':>9} {'stem':>7} {'pooling':>7} "
          f"{'rounds':>6}")
