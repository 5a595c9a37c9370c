"""The benchmark's rows: throughput, compile times and the command's start-up, on a small model."""
import subprocess
import sys

import pytest

from mobilenet.bench import benchmark
from mobilenet.models import counting
from mobilenet.training import config_base


def test_process_age_counts_from_the_command_not_from_the_import():
  probe = ('import time; time.sleep(1.5); from mobilenet.training import metrics; '
           'print(metrics.seconds_since_process_start())')
  result = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True,
                          timeout=120)
  age = float(result.stdout.strip().splitlines()[-1])
  assert 1.5 <= age < 120


@pytest.mark.slow
def test_the_first_row_says_how_long_the_command_took_to_its_first_step():
  config = config_base.base_config()
  config.model.width_multiplier = 0.25
  config.model.resolution = 16
  config.batch_size = 4
  setting = next(benchmark.settings_grid(config))
  first = benchmark.benchmark_setting(config, setting, warmup=1, steps=2, first=True)
  totals = counting.totals(counting.model_layer_specs(setting.apply(config)))
  assert (first['params'], first['batch_stats']) == (totals.params, totals.batch_stats)
  parts = first['init_s'] + first['train_compile_s'] + first['first_train_step_s']
  assert first['command_to_first_step_s'] >= parts - 0.05  # Rounding of the parts.
  assert 0 < first['train_lower_s'] < first['train_compile_s']
  line = benchmark.format_startup(first)
  assert line.startswith(f'start-up: {first["command_to_first_step_s"]:.1f} s from the command')
  assert 'start-up:' in benchmark.format_table([first, {**first, 'command_to_first_step_s': None}])
  assert 'start-up:' not in benchmark.format_table([{**first, 'command_to_first_step_s': None}])


def test_the_depthwise_kernel_benchmark_parses_shapes_and_times_all_three_calls():
  from mobilenet.bench import depthwise_kernels  # pylint: disable=g-import-not-at-top
  from mobilenet.ops.cpu import kernels  # pylint: disable=g-import-not-at-top
  layer = depthwise_kernels.Layer.parse('4x2x3x16k5s1')
  assert layer == depthwise_kernels.Layer(4, 2, 3, 16, 5, 1)
  for wrong in ('4x2x3', '4x2k5s1', '4x2x3x16k5'):
    with pytest.raises(ValueError):
      depthwise_kernels.Layer.parse(wrong)
  if not kernels.available():
    pytest.skip('no C++ compiler: the kernels cannot be timed')
  row, = depthwise_kernels.time_layers([layer], warmup=1, steps=3)
  assert row['layer'] == '4x2x3x16 5x5/1'
  assert all(row[key] > 0 for key in ('forward_ms', 'filter_grad_ms', 'input_grad_ms'))
  assert 'filter grad ms' in depthwise_kernels.format_rows([row])
