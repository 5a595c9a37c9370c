"""Times the fused depthwise kernels' calls (forward, filter and input gradients, the backward as one
call and as the three it replaces, in turn) per layer shape.

  python3 scripts/benchmark_depthwise_kernels.py
  python3 scripts/benchmark_depthwise_kernels.py --layers=16x112x112x16k3s2 --json

Shapes are BATCHxHEIGHTxWIDTHxCHANNELS k FILTER s STRIDE, with e CHANNELS for an input expanded
from that many channels (the expansion then also runs inside the kernel) and p CHANNELS for an
output multiplied into that many (the product then also runs in the kernel and after it, in
turn, with their paired ratio: what models/fused_inference.py's V1 rule rests on); the default list is
V3-Small's and V1's maps no larger than the filter in the 32x32 form (batch 128)
and a larger map for comparison (mobilenet/bench/depthwise_kernels.py).
"""
import json

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags  # pylint: disable=g-import-not-at-top

from mobilenet import errors
from mobilenet.bench import depthwise_kernels

_LAYERS = flags.DEFINE_list(
    'layers', ['128x2x2x576k5s1', '128x2x2x288k5s1', '128x4x4x240k5s1', '128x4x4x144k5s1',
               '128x2x2x1024k3s1', '128x8x8x240k5s2'],
    'Layer shapes, BATCHxHEIGHTxWIDTHxCHANNELS k FILTER s STRIDE [e EXPANDED FROM] '
    '[p PROJECTED TO].')
_STEPS = flags.DEFINE_integer('steps', 100, 'Timed calls per kernel; the median is reported.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON line per layer instead of a table.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}')
  try:
    layers = [depthwise_kernels.Layer.parse(text) for text in _LAYERS.value]
  except ValueError:
    raise errors.UserError(f'--layers={",".join(_LAYERS.value)}: each shape is written like '
                           '128x2x2x576k5s1 (batch x height x width x channels, k filter size, '
                           's stride), 16x7x7x576k5s1e96 (e: expanded from 96 channels) or '
                           '128x4x4x256k3s1p256 (p: multiplied into 256 channels)') from None
  rows = depthwise_kernels.time_layers(layers, steps=_STEPS.value)
  print('\n'.join(map(json.dumps, rows)) if _JSON.value else depthwise_kernels.format_rows(rows),
        flush=True)


if __name__ == '__main__':
  errors.run(main)
