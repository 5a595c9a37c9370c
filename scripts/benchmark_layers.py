"""Share of a training step's time per kind of layer (depthwise, pointwise, BatchNorm, ...).

  python3 scripts/benchmark_layers.py --config configs/cifar10.py --config.model.width_multiplier=0.5
  python3 scripts/benchmark_layers.py --config configs/imagenet.py --config.batch_size=256 --json

Times every layer of the configured variant on its own (forward + backward, at
its shape in the network) and the whole training step, on synthetic inputs;
prints per-kind totals and shares (a table, or one JSON object with --json;
--per_layer adds one JSON line per layer).
"""
import json

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mobilenet.bench import benchmark
from mobilenet.training import config_base
from mobilenet import errors
from mobilenet.bench import layer_timing

config_flags.DEFINE_config_file('config', None, errors.CONFIG_HELP, lock_config=True)
errors.mark_required(['config'])
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed runs after compiling.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed runs; the median is reported.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
_PER_LAYER = flags.DEFINE_bool('per_layer', False, 'Also print one JSON line per layer.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; pass settings as --config.x=y')
  config = flags.FLAGS.config
  config_base.validate(config)
  setting = next(benchmark.settings_grid(config))
  step = benchmark.benchmark_setting(config, setting, warmup=_WARMUP.value, steps=_STEPS.value)
  rows = []
  for row in layer_timing.time_layers(config, warmup=_WARMUP.value, steps=_STEPS.value):
    rows.append(row)
    if _PER_LAYER.value:
      print(json.dumps(row), flush=True)
  summary = layer_timing.summarize(rows, config, step['train_step_ms'])
  print(json.dumps(summary) if _JSON.value else layer_timing.format_summary(summary), flush=True)

if __name__ == '__main__':
  errors.run(main)
