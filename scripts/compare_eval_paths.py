r"""What each inference fusion brings: layer by layer vs the fused kernels, in one process.

  python3 scripts/compare_eval_paths.py --config configs/cifar10.py \
      --architectures=mobilenet_v1,mobilenet_v2 --width_multipliers=0.5,1.0

For each architecture and width: the forward pass layer by layer, fused with each depthwise
layer and 1x1 product a kernel of its own, fused with the two in one kernel but an inverted
residual block's expansion apart, the same with the stem apart, the same with squeeze-and-
excitation's pooling apart, and fused with all of them in that kernel, called in turn round
after round for --seconds (mobilenet/bench/eval_paths.py); prints the median ms per batch of
each and the median paired speed-ups of the fused form over the two-kernel form and over each
one apart. The tables in docs/performance.md (twelfth, fourteenth and fifteenth rounds) come
from this command.
"""
import json

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mobilenet import errors
from mobilenet.bench import benchmark, eval_paths
from mobilenet.training import config_base

config_flags.DEFINE_config_file('config', None, errors.CONFIG_HELP, lock_config=True)
errors.mark_required(['config'])
_ARCHITECTURES = flags.DEFINE_list('architectures', [],
                                   'config.model.name values, e.g. mobilenet_v1,mobilenet_v2.')
_WIDTH_MULTIPLIERS = flags.DEFINE_list('width_multipliers', [], 'Width multipliers (alpha).')
_SECONDS = flags.DEFINE_float('seconds', 10.0, 'Seconds of alternating calls per setting.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per setting instead of a table.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; pass settings as --config.x=y')
  config = flags.FLAGS.config
  grid = list(benchmark.settings_grid(
      config, architectures=_ARCHITECTURES.value,
      width_multipliers=[float(v) for v in _WIDTH_MULTIPLIERS.value]))
  for setting in grid:  # Reject every bad value before the first compile.
    config_base.validate(setting.apply(config))
  if not _JSON.value:
    print(eval_paths.HEADER, flush=True)
  for setting in grid:
    row = eval_paths.compare(setting.apply(config), seconds=_SECONDS.value)
    print(json.dumps(row) if _JSON.value else eval_paths.format_row(row), flush=True)


if __name__ == '__main__':
  errors.run(main)
