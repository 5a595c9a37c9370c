"""Prints the examples/s of a config's train and eval input pipelines.

  python3 scripts/benchmark_input.py --config configs/fashion_mnist.py
  python3 scripts/benchmark_input.py --config configs/cifar10.py --num_batches 500

A dataset that is not prepared in the data dir (and cannot be had, see
`input_pipeline.ensure_available`) is measured on TFDS mock data of the same
shapes, which the output says; --nomock_if_missing turns that into an error.
"""

from absl import flags
from ml_collections import config_flags

from mobilenet.training import config_base
from mobilenet import errors
from mobilenet.bench import input_benchmark
from mobilenet.data import input_pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, errors.CONFIG_HELP)
errors.mark_required(['config'])
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 200, 'Batches timed per pipeline, after the first.')
_MOCK_IF_MISSING = flags.DEFINE_bool(
    'mock_if_missing', True, 'Measure on mock data when the dataset is not available.')
_MOCK_EXAMPLES = 10_000  # Per split; the steady-state rate does not depend on it.


def _print_rates(config, source: str) -> None:
  for name, rate in input_benchmark.benchmark(config, _NUM_BATCHES.value).items():
    print(f'{config.dataset} {name} ({source}): {rate.examples_per_s:,.0f} examples/s '
          f'(batch {rate.batch_size}, {rate.num_batches} batches, '
          f'first batch after {rate.startup_s:.1f} s)', flush=True)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; pass settings as --config.x=y')
  config = _CONFIG.value
  config_base.validate(config)  # A bad field must not pass for a missing dataset.
  try:
    input_pipeline.ensure_available(config)
  except errors.UserError as error:
    if not _MOCK_IF_MISSING.value:
      raise
    print(f'{config.dataset} is not available ({error}); measuring TFDS mock data '
          f'({_MOCK_EXAMPLES:,} random examples per split) instead.', flush=True)
    with input_benchmark.mock_dataset(config.dataset, _MOCK_EXAMPLES) as mock_dir:
      config.data_dir = mock_dir
      _print_rates(config, 'mock data')
    return
  _print_rates(config, 'real data')


if __name__ == '__main__':
  errors.run(main)
