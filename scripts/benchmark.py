r"""Train/eval images per second, start-up, compile time and memory of the MobileNet family on synthetic batches.

  python3 scripts/benchmark.py --config configs/cifar10.py --width_multipliers=0.25,0.5,1.0 \
      --implementations=xla,shifted --json
  python3 scripts/benchmark.py --config configs/cifar10.py \
      --architectures=mobilenet_v1,mobilenet_v2,mobilenet_v3_small

One row (or, with --json, one JSON line) per combination of the list flags;
an empty list flag keeps the config's value. Uses whatever backend JAX sees.
Each row has the train step's compile time (and the tracing's share of it) and
its first call; after the table (with --json, on stderr) one line says how long
the command took to its first training step, and where that time went:

  python3 scripts/benchmark.py --config configs/default.py --steps=3
"""
import json
import sys

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mobilenet.bench import benchmark
from mobilenet.training import config_base
from mobilenet import errors

config_flags.DEFINE_config_file('config', None, errors.CONFIG_HELP, lock_config=True)
errors.mark_required(['config'])
_IMPLEMENTATIONS = flags.DEFINE_list('implementations', [],
                                     'Depthwise implementations, e.g. xla,shifted,auto.')
_ARCHITECTURES = flags.DEFINE_list('architectures', [],
                                   'config.model.name values, e.g. mobilenet_v1,mobilenet_v2.')
_WIDTH_MULTIPLIERS = flags.DEFINE_list('width_multipliers', [], 'Width multipliers (alpha).')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', [], 'Batch sizes.')
_RESOLUTIONS = flags.DEFINE_list('resolutions', [], 'Input sides.')
_DTYPES = flags.DEFINE_list('dtypes', [], 'Compute dtypes: float32, bfloat16.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps; the median is reported.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per setting instead of a table.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; pass settings as --config.x=y')
  config = flags.FLAGS.config
  grid = list(benchmark.settings_grid(
      config, architectures=_ARCHITECTURES.value, width_multipliers=[float(v) for v in _WIDTH_MULTIPLIERS.value],
      batch_sizes=[int(v) for v in _BATCH_SIZES.value],
      resolutions=[int(v) for v in _RESOLUTIONS.value], dtypes=_DTYPES.value,
      implementations=_IMPLEMENTATIONS.value))
  for setting in grid:  # Reject every bad value before the first compile.
    config_base.validate(setting.apply(config))
  rows = []
  for index, setting in enumerate(grid):
    row = benchmark.benchmark_setting(config, setting, warmup=_WARMUP.value, steps=_STEPS.value,
                                      first=index == 0)
    rows.append(row)
    if _JSON.value:
      print(json.dumps(row), flush=True)
      if index == 0 and row['command_to_first_step_s'] is not None:
        print(benchmark.format_startup(row), file=sys.stderr, flush=True)
  if not _JSON.value:
    print(benchmark.format_table(rows))


if __name__ == '__main__':
  errors.run(main)
