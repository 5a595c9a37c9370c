"""The benchmark's rows: throughput, compile times and the command's start-up, on a small model."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from mobilenet.bench import benchmark, eval_paths
from mobilenet.models import mobilenet as model_lib
from mobilenet.ops.cpu import kernels as cpu_kernels
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


def test_the_depthwise_kernel_benchmark_parses_shapes_and_times_each_call():
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
  assert all(row[key] > 0 for key in ('forward_ms', 'filter_grad_ms', 'input_grad_ms',
                                       'backward_one_call_ms', 'backward_three_calls_ms',
                                       'backward_one_call_speedup'))
  assert 'filter grad ms' in depthwise_kernels.format_rows([row])
  assert 'one vs three' in depthwise_kernels.format_rows([row])
  expanded = depthwise_kernels.Layer.parse('4x6x6x16k3s2e8')
  assert expanded == depthwise_kernels.Layer(4, 6, 6, 16, 3, 2, expanded_from=8)
  row, = depthwise_kernels.time_layers([expanded], warmup=1, steps=3)
  assert row['layer'] == '4x6x6x16 3x3/2 from 8' and row['expanded_forward_ms'] > 0
  projected = depthwise_kernels.Layer.parse('4x6x6x16k3s1p24')
  assert projected == depthwise_kernels.Layer(4, 6, 6, 16, 3, 1, projected_to=24)
  row, = depthwise_kernels.time_layers([projected], warmup=1, steps=3)
  assert row['layer'] == '4x6x6x16 3x3/1 to 24'
  assert row['one_kernel_ms'] > 0 and row['two_kernels_ms'] > 0 and row['one_kernel_speedup'] > 0
  assert 'one vs two' in depthwise_kernels.format_rows([row])
  assert 'expanded forward ms' in depthwise_kernels.format_rows([row])


@pytest.mark.skipif(not cpu_kernels.available(), reason='needs a C++ compiler')
def test_the_eval_paths_comparison_times_all_six_forward_passes_in_turn():
  config = config_base.base_config()
  config.model.name, config.model.width_multiplier = 'mobilenet_v3_small', 0.35
  config.model.resolution, config.batch_size = 32, 4
  row = eval_paths.compare(config, seconds=0.5)
  assert row['rounds'] >= 1 and row['architecture'] == 'mobilenet_v3_small'
  for path in eval_paths.PATHS:
    assert row[f'{path}_ms'] > 0
  assert row['fused_speedup'] > 0 and row['layer_by_layer_speedup'] > 0
  for fusion in ('expansion', 'stem', 'pooling'):
    assert row[f'{fusion}_speedup'] > 0
  assert eval_paths.format_row(row).split()[0] == 'mobilenet_v3_small'
  # Only the one-kernel paths compute a depthwise layer and its product together, only those
  # with the expansion the expansions in that kernel too (fewer 1x1 products of their own),
  # only those with the stem the stem (no convolution kernel of its own), and only those with
  # the pooling squeeze-and-excitation's means (no reduction of XLA's).
  model = model_lib.create_model(config.model)
  images = benchmark.synthetic_batch(config)['image']
  variables = model.init(jax.random.key(0), images)
  passes = eval_paths._forward_passes(model)
  hlo = {name: jax.jit(fn).lower(variables, images).as_text() for name, fn in passes.items()}
  assert 'mobilenet_separable_inference' in hlo['fused']
  assert 'mobilenet_separable_inference' not in hlo['fused_two_kernels']
  assert 'mobilenet_depthwise_inference' in hlo['fused_two_kernels']
  products = {name: text.count('@mobilenet_pointwise_inference(')
              for name, text in hlo.items()}
  assert 0 < products['fused'] < products['fused_expansion_apart']
  assert products['fused'] == products['fused_stem_apart']
  stem_calls = {name: text.count('@mobilenet_conv_forward(') for name, text in hlo.items()}
  assert stem_calls['fused'] == stem_calls['fused_expansion_apart'] == 0
  assert stem_calls['fused_stem_apart'] == stem_calls['fused_two_kernels'] == 1
  reductions = {name: text.count('stablehlo.reduce') for name, text in hlo.items()}
  assert reductions['fused'] < reductions['fused_pooling_apart']
  for name in ('fused', 'fused_expansion_apart', 'fused_stem_apart', 'fused_pooling_apart'):
    np.testing.assert_allclose(jax.jit(passes[name])(variables, images),
                               jax.jit(passes['fused_two_kernels'])(variables, images),
                               rtol=1e-4, atol=1e-4)
