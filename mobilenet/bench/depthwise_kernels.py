"""The fused depthwise kernels' calls, timed one by one at given layer shapes.

A training step's depthwise layer with the BatchNorm + activation before it
fused (ops/norm_depthwise.py) makes two depthwise C++ calls: the forward (the
same kernel fused inference runs, `depthwise.inference_kernel_call`) and the
backward (`activated_backward_kernel_call`: the filter gradient with the input
re-activated as it is read, the input gradient and BatchNorm's backward sums).
The table has the forward, the filter gradient alone, the input gradient
alone (`input_grad_kernel_call`), and the backward as one call and as the
three calls it replaces (filter gradient, input gradient, the BatchNorm's
backward-sums kernel), called in turn, with their paired ratio. Whole-step timings on a small shared machine move
by 10-30% between runs; these isolate one layer's kernels, e.g. the maps no
larger than the filter of V3's last blocks in the 32x32 form. Each call is
jitted on its own, run on random float32 inputs (hard-swish on both sides of
the forward), and timed as the median of `steps` calls after `warmup`.

A layer written with an expansion ('16x7x7x576k5s1e96': its input expanded from
96 channels) also times fused inference's call that computes the expansion band
by band inside the depthwise kernel (`separable.separable_inference` with
`expand_kernel` and no projection), from the block's 96-channel input. A layer
written with a product ('128x4x4x256k3s1p256': its output multiplied into 256
channels, a V1 block) also times the depthwise layer and the product in one
kernel (`separable.separable_inference`) and in two (the inference forward,
then `pointwise.matrix_product`), called in turn, and their paired ratio.
"""
import dataclasses
import re
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mobilenet.bench import benchmark
from mobilenet.ops import batch_norm, depthwise, pointwise, separable
from mobilenet.ops.cpu import kernels as cpu_kernels


@dataclasses.dataclass(frozen=True)
class Layer:
  """A depthwise layer: batch, input height and width, channels, filter size, stride, the
  channels its input is expanded from (an inverted residual block's) and the channels its output
  is multiplied into (a V1 block's product), if any."""
  batch: int
  height: int
  width: int
  channels: int
  kernel_size: int
  stride: int
  expanded_from: Optional[int] = None
  projected_to: Optional[int] = None

  @classmethod
  def parse(cls, text: str) -> 'Layer':
    """'128x2x2x576k5s1' -> Layer(128, 2, 2, 576, 5, 1); '...s1e96' -> expanded_from=96;
    '...s1p256' -> projected_to=256."""
    match = re.fullmatch(r'(\d+)x(\d+)x(\d+)x(\d+)k(\d+)s(\d+)(?:e(\d+))?(?:p(\d+))?',
                         text.lower())
    if match is None:
      raise ValueError(f'{text}: not BATCHxHEIGHTxWIDTHxCHANNELS k FILTER s STRIDE [e N] [p N]')
    *dimensions, expanded_from, projected_to = match.groups()
    return cls(*map(int, dimensions), int(expanded_from) if expanded_from else None,
               int(projected_to) if projected_to else None)

  def label(self) -> str:
    expansion = f' from {self.expanded_from}' if self.expanded_from else ''
    product = f' to {self.projected_to}' if self.projected_to else ''
    return (f'{self.batch}x{self.height}x{self.width}x{self.channels} '
            f'{self.kernel_size}x{self.kernel_size}/{self.stride}{expansion}{product}')


def _median_ms(fn, args, warmup: int, steps: int) -> float:
  return 1e3 * benchmark.median_seconds(lambda: jax.block_until_ready(fn(*args)), warmup, steps)


def time_layer(layer: Layer, *, warmup: int = 5, steps: int = 100, seed: int = 0) -> Dict[str, float]:
  """Milliseconds of the forward, filter-gradient and input-gradient calls for `layer`, and of
  the forward with the expansion inside it where `layer` has one."""
  if not cpu_kernels.available():
    raise RuntimeError(f'the C++ CPU kernels are unavailable: {cpu_kernels.error()}')
  rng = np.random.default_rng(seed)
  k, s, c = layer.kernel_size, (layer.stride, layer.stride), layer.channels
  pads = depthwise.explicit_padding((layer.height, layer.width), (k, k), s, 'SAME')
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  x = normal(layer.batch, layer.height, layer.width, c)
  kernel = normal(k, k, c)
  scale, bias = normal(c), normal(c)
  forward = jax.jit(lambda x: depthwise.inference_kernel_call(
      x, kernel, scale, bias, scale, bias, strides=s, pads=pads,
      input_activation=jax.nn.hard_swish, output_activation=jax.nn.hard_swish))
  g = normal(*jax.eval_shape(forward, x).shape)
  mean = jnp.mean(x, axis=(0, 1, 2))
  filter_grad = lambda x, g: depthwise.activated_backward_kernel_call(
      x, g, kernel, scale, bias, mean, strides=s, pads=pads, input_activation=jax.nn.hard_swish,
      input_grad=False)
  input_grad = lambda g: depthwise.input_grad_kernel_call(g, kernel, x.shape, strides=s, pads=pads)

  def three_calls(x, g):
    d_activated = input_grad(g)
    sums = batch_norm.kernel_backward_sums(x, d_activated, scale, bias, mean,
                                           batch_norm.KERNEL_ACTIVATIONS[jax.nn.hard_swish])
    return filter_grad(x, g), d_activated, *sums

  one_call = lambda x, g: depthwise.activated_backward_kernel_call(
      x, g, kernel, scale, bias, mean, strides=s, pads=pads, input_activation=jax.nn.hard_swish)
  times = {'forward_ms': _median_ms(forward, (x,), warmup, steps),
           'filter_grad_ms': _median_ms(jax.jit(filter_grad), (x, g), warmup, steps),
           'input_grad_ms': _median_ms(jax.jit(input_grad), (g,), warmup, steps)}
  times.update(_paired_ms({'backward_one_call': jax.jit(one_call),
                           'backward_three_calls': jax.jit(three_calls)}, (x, g), warmup, steps))
  if layer.expanded_from:
    block_input = normal(layer.batch, layer.height, layer.width, layer.expanded_from)
    expand = normal(layer.expanded_from, c) / np.sqrt(layer.expanded_from)
    expanded_forward = jax.jit(lambda x: separable.separable_inference(
        x, kernel[:, :, None], input_affine=(scale, bias), output_affine=(scale, bias),
        input_activation=jax.nn.hard_swish, output_activation=jax.nn.hard_swish,
        expand_kernel=expand, strides=s))
    times['expanded_forward_ms'] = _median_ms(expanded_forward, (block_input,), warmup, steps)
  if layer.projected_to:
    w = normal(c, layer.projected_to) / np.sqrt(c)
    ones, zeros = jnp.ones(layer.projected_to), jnp.zeros(layer.projected_to)
    relu = jax.nn.relu
    one_kernel = jax.jit(lambda x: separable.separable_inference(
        x, kernel[:, :, None], w, input_affine=(scale, bias), output_affine=(scale, bias),
        input_activation=relu, output_activation=relu, scale=ones, bias=zeros, strides=s))
    two_kernels = jax.jit(lambda x: pointwise.matrix_product(depthwise.inference_kernel_call(
        x, kernel, scale, bias, scale, bias, strides=s, pads=pads, input_activation=relu,
        output_activation=relu), w))
    times.update(_paired_ms({'one_kernel': one_kernel, 'two_kernels': two_kernels}, (x,), warmup,
                            steps))
  return times


def _paired_ms(calls: Dict[str, Callable], args, warmup: int, steps: int) -> Dict[str, float]:
  """Each call's median ms, called in turn `steps` times, and the median of the per-turn ratios
  of the second's time over the first's (the machine's drift cancels in each turn)."""
  for fn in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(steps):
    for name, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  (first, a), (second, b) = times.items()
  return {**{f'{name}_ms': 1e3 * statistics.median(t) for name, t in times.items()},
          f'{first}_speedup': statistics.median(tb / ta for ta, tb in zip(a, b))}


def time_layers(layers: Sequence[Layer], **kwargs) -> List[Dict[str, object]]:
  return [{'layer': layer.label(), **{key: round(value, 3) for key, value in
                                      time_layer(layer, **kwargs).items()}} for layer in layers]


def format_rows(rows: Sequence[Dict[str, object]]) -> str:
  optional = (('backward, one call ms', 'backward_one_call_ms', '.3f'),
              ('three calls ms', 'backward_three_calls_ms', '.3f'),
              ('one vs three', 'backward_one_call_speedup', '.3f'),
              ('expanded forward ms', 'expanded_forward_ms', '.3f'),
              ('one kernel ms', 'one_kernel_ms', '.3f'), ('two kernels ms', 'two_kernels_ms', '.3f'),
              ('one vs two', 'one_kernel_speedup', '.3f'))
  lines = [f"{'layer':<40}{'forward ms':>12}{'filter grad ms':>16}{'input grad ms':>15}"
           + ''.join(f'{title:>21}' for title, _, _ in optional)]
  for row in rows:
    cells = ''.join(f"{'-' if row.get(key) is None else format(row[key], spec):>21}"
                    for _, key, spec in optional)
    lines.append(f"{row['layer']:<40}{row['forward_ms']:>12.3f}{row['filter_grad_ms']:>16.3f}"
                 f"{row['input_grad_ms']:>15.3f}" + cells)
  return '\n'.join(lines)
