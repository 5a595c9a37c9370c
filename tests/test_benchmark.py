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
