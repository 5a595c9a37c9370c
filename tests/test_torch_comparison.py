"""The PyTorch yardstick's driver: same networks or a refusal, each side's command, the summary.

The PyTorch side itself needs .venv-torch, which the project does not install;
these tests cover everything the driver decides without it.
"""
import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from mobilenet import malloc_tuning
from mobilenet.bench import torch_comparison
from mobilenet.errors import UserError

ROOT = torch_comparison.ROOT


def test_the_grid_refuses_an_unknown_form_or_architecture_by_name():
  with pytest.raises(UserError, match="unknown form 'mnist'"):
    torch_comparison.settings_grid(['mnist'], ['mobilenet_v1'], [1.0])
  with pytest.raises(UserError, match='mobilenet_v3_large_minimalistic.*no PyTorch definition'):
    torch_comparison.settings_grid(['cifar'], ['mobilenet_v3_large_minimalistic'], [1.0])
  grid = torch_comparison.settings_grid(['cifar', 'imagenet'], ['mobilenet_v2'], [0.5, 1.0])
  assert [s.label for s in grid] == ['cifar mobilenet_v2 0.5', 'cifar mobilenet_v2 1',
                                     'imagenet mobilenet_v2 0.5', 'imagenet mobilenet_v2 1']


def test_different_networks_are_refused_in_one_line():
  setting = torch_comparison.Setting('cifar', 'mobilenet_v1', 1.0)
  ours = torch_comparison.project_counts(setting)
  # CIFAR-10's MobileNetV1: 3 input channels, 10 classes (the counts scripts/count_params.py prints).
  assert ours == {'params': 3_217_226, 'batch_stats': 21_888}
  torch_comparison.check_same_networks(setting, ours, dict(ours))
  with pytest.raises(UserError) as refused:
    torch_comparison.check_same_networks(setting, ours, {**ours, 'params': ours['params'] + 10})
  message = str(refused.value)
  assert '\n' not in message and 'refusing to compare' in message
  assert '3,217,236' in message and '3,217,226' in message


def test_the_pytorch_side_gets_the_forms_shapes_and_recipe():
  cifar = torch_comparison.torch_command(
      ROOT / '.venv-torch/bin/python', torch_comparison.Setting('cifar', 'mobilenet_v1', 0.5),
      threads=2, warmup=1, steps=3)
  imagenet = torch_comparison.torch_command(
      ROOT / '.venv-torch/bin/python', torch_comparison.Setting('imagenet', 'mobilenet_v2', 1.0),
      threads=1, warmup=1, steps=3, counts_only=True)
  flags = lambda command: dict(zip(command[2::2], command[3::2]))  # pylint: disable=unnecessary-lambda-assignment
  assert flags(cifar)['--form'] == 'cifar' and flags(cifar)['--resolution'] == '32'
  assert flags(cifar)['--batch_size'] == '128' and flags(cifar)['--num_classes'] == '10'
  assert flags(cifar)['--optimizer'] == 'sgd' and flags(cifar)['--threads'] == '2'
  assert flags(cifar)['--width_multiplier'] == '0.5'
  assert imagenet[-1] == '--counts_only'
  assert flags(imagenet[:-1])['--form'] == 'imagenet' and flags(imagenet[:-1])['--resolution'] == '224'
  assert flags(imagenet[:-1])['--batch_size'] == '16'
  assert flags(imagenet[:-1])['--num_classes'] == '1000'
  assert flags(imagenet[:-1])['--optimizer'] == 'rmsprop'
  assert flags(imagenet[:-1])['--label_smoothing'] == '0.1'


def test_our_side_command_is_accepted_by_the_benchmark_script():
  command = torch_comparison.our_command(torch_comparison.Setting('imagenet', 'mobilenet_v3_small', 0.75),
                                         warmup=1, steps=2)
  result = subprocess.run([*command, '--only_check_args'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]


def test_each_side_runs_on_the_given_cpus_only():
  cpus = torch_comparison.cpu_set(1)
  probe = 'import json, os; print(json.dumps({"cpus": sorted(os.sched_getaffinity(0)), ' \
          '"omp": os.environ["OMP_NUM_THREADS"]}))'
  assert torch_comparison.run_json([sys.executable, '-c', probe], cpus, 'probe') == {
      'cpus': cpus, 'omp': '1'}
  with pytest.raises(UserError, match=r'--threads=999: this machine lets the process use \d+ CPUs'):
    torch_comparison.cpu_set(999)


def test_a_failing_side_is_reported_with_its_last_line():
  command = [sys.executable, '-c', 'import sys; print("noise", file=sys.stderr); sys.exit("bad flag")']
  with pytest.raises(UserError, match=r'^probe failed \(exit 1\): bad flag$'):
    torch_comparison.run_json(command, torch_comparison.cpu_set(1), 'probe')


def test_no_side_is_measured_twice_in_a_row_and_each_takes_every_place():
  sides = ('torch', 'torch_tuned', 'ours')
  sequence = [side for r in range(6) for side in torch_comparison.round_order(sides, r)]
  assert all(a != b for a, b in zip(sequence, sequence[1:]))
  for place in range(3):
    assert {torch_comparison.round_order(sides, r)[place] for r in range(3)} == set(sides)
  assert torch_comparison.round_order(('torch', 'ours'), 1) == ['ours', 'torch']


def test_the_summary_takes_medians_over_rounds_and_the_ratio(tmp_path):
  setting = torch_comparison.Setting('cifar', 'mobilenet_v2', 1.0)
  measurements = [
      {'side': 'torch', 'round': 1, 'train_img_s': 100.0, 'eval_img_s': 500.0},
      {'side': 'ours', 'round': 1, 'train_img_s': 150.0, 'eval_img_s': 400.0, 'train_compile_s': 9.0},
      {'side': 'ours', 'round': 2, 'train_img_s': 170.0, 'eval_img_s': 450.0, 'train_compile_s': 11.0},
      {'side': 'torch', 'round': 2, 'train_img_s': 120.0, 'eval_img_s': 700.0},
      {'side': 'torch', 'round': 3, 'train_img_s': 80.0, 'eval_img_s': 600.0},
      {'side': 'ours', 'round': 3, 'train_img_s': 190.0, 'eval_img_s': 500.0, 'train_compile_s': 10.0},
  ]
  counts = {'params': 2_236_682, 'batch_stats': 34_112}
  row = torch_comparison.summarize(setting, counts, measurements)
  assert row['rounds'] == 3
  assert (row['torch_train_img_s'], row['ours_train_img_s'], row['train_ratio']) == (100.0, 170.0, 1.7)
  assert (row['torch_eval_img_s'], row['ours_eval_img_s'], row['eval_ratio']) == (600.0, 450.0, 0.75)
  assert row['ours_train_compile_s'] == 10.0
  table = torch_comparison.format_table([row])
  assert '| cifar | mobilenet_v2 | 1.0 | 2,236,682 | 100.0 | 170.0 | 1.70x | 600.0 | 450.0 | 0.75x |' \
      in table
  paths = torch_comparison.write_results(tmp_path / 'comparison', {'cpu': 'x'}, [row], measurements)
  assert [p.name for p in paths] == ['comparison.csv', 'comparison.json']
  with open(paths[0]) as file:
    assert float(next(csv.DictReader(file))['train_ratio']) == 1.7
  assert len(json.loads(paths[1].read_text())['measurements']) == 6


def test_the_cli_without_the_pytorch_environment_says_how_to_make_it(tmp_path):
  result = subprocess.run(
      [sys.executable, 'scripts/compare_with_pytorch.py', f'--torch_python={tmp_path}/python',
       '--forms=cifar', '--architectures=mobilenet_v1'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
      env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f'error: no PyTorch environment at {tmp_path}/python; create it with: '
      'bash scripts/setup_torch_reference.sh']


def test_profile_commands_reach_both_sides_profilers():
  setting = torch_comparison.Setting('cifar', 'mobilenet_v3_small', 0.5)
  theirs = torch_comparison.torch_command(ROOT / '.venv-torch/bin/python', setting, threads=2,
                                          warmup=1, steps=2, profile=True)
  assert theirs[-1] == '--profile'
  ours = torch_comparison.our_profile_command(setting, warmup=1, steps=2)
  assert '--config.model.name=mobilenet_v3_small' in ours and '--config.batch_size=128' in ours
  result = subprocess.run([*ours, '--only_check_args'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]


def test_the_profile_table_puts_both_sides_kinds_side_by_side():
  setting = torch_comparison.Setting('imagenet', 'mobilenet_v2', 1.0)
  theirs = {'train_step_ms': 380.0, 'profile_ms_per_step': {
      'step': 400.0, 'pointwise': 110.0, 'depthwise': 70.0, 'batch_norm_activation': 200.0}}
  ours = {'step_ms': 250.0, 'kinds': [{'kind': 'pointwise', 'ms_per_step': 120.5},
                                      {'kind': 'depthwise', 'ms_per_step': 80.25}]}
  row = torch_comparison.profile_row(setting, theirs, ours)
  assert row['torch_pointwise_ms'] == 110.0 and row['ours_pointwise_ms'] == 120.5
  assert row['torch_squeeze_excite_ms'] == 0.0 and row['ours_batch_norm_activation_ms'] == 0.0
  table = torch_comparison.format_profile_table([row])
  assert '| imagenet | mobilenet_v2 | 1.0 | 400 / 250 | 110.0 / 120.5 | 70.0 / 80.2 | 200.0 / 0.0 |' \
      in table


def _torch_reference():
  spec = importlib.util.spec_from_file_location('torch_reference', ROOT / 'scripts/torch_reference.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # Imports torch only inside its functions.
  return module


def test_the_pytorch_profile_gives_each_operation_the_kind_of_its_layer():
  reference = _torch_reference()
  event = lambda name, shapes=(), parent=None: types.SimpleNamespace(  # pylint: disable=unnecessary-lambda-assignment
      name=name, input_shapes=[list(s) for s in shapes], cpu_parent=parent)
  forward = event('model_forward')
  # Forward convolutions: (input, weight, bias, ...); backward: (output gradient, input, weight, ...).
  depthwise = event('aten::convolution', [(8, 96, 16, 16), (96, 1, 3, 3), ()], forward)
  pointwise = event('aten::convolution', [(8, 16, 16, 16), (96, 16, 1, 1), ()], forward)
  stem = event('aten::convolution', [(8, 3, 32, 32), (32, 3, 3, 3), ()], forward)
  excite = event('aten::convolution', [(8, 96, 1, 1), (24, 96, 1, 1), (24,)], forward)
  depthwise_backward = event('aten::convolution_backward',
                             [(8, 96, 8, 8), (8, 96, 16, 16), (96, 1, 3, 3)])
  kind = lambda e, se=True: reference._event_kind(e, se)  # pylint: disable=protected-access,unnecessary-lambda-assignment
  assert kind(event('mkldnn_convolution', parent=depthwise)) == 'depthwise'
  assert kind(event('aten::empty', parent=pointwise)) == 'pointwise'
  assert kind(stem) == 'standard' and kind(excite) == 'squeeze_excite'
  assert kind(event('aten::fill_', parent=depthwise_backward)) == 'depthwise'
  assert kind(event('aten::native_batch_norm', parent=forward)) == 'batch_norm_activation'
  assert kind(event('aten::hardswish_backward')) == 'batch_norm_activation'
  assert kind(event('aten::hardsigmoid', parent=forward)) == 'squeeze_excite'
  assert kind(event('aten::addmm', parent=forward)) == 'dense'
  assert kind(event('aten::mul', parent=forward)) == 'squeeze_excite'
  assert kind(event('aten::mul', parent=forward), se=False) == 'loss_optimizer_other'
  assert kind(event('aten::add', parent=forward)) == 'residual_and_glue'
  step = event('Optimizer.step#SGD.step')
  assert kind(event('aten::add_', parent=event('aten::_foreach_add_', parent=step))) == \
      'loss_optimizer_other'


def test_pytorch_runs_with_the_malloc_its_users_have_unless_asked(monkeypatch):
  tuned = malloc_tuning.tuned_environment({'HOME': '/x'})
  monkeypatch.setattr(os, 'environ', tuned)
  assert not {'GLIBC_TUNABLES', 'LD_PRELOAD'} & set(torch_comparison.side_environment('torch'))
  assert 'glibc.malloc.mmap_max=0' in torch_comparison.side_environment('torch_tuned')['GLIBC_TUNABLES']
  assert torch_comparison.side_environment('ours') == tuned
  with pytest.raises(UserError, match='--torch_malloc=fast: choose from as_installed, tuned, both'):
    torch_comparison.compare([], torch_python=pathlib.Path(sys.executable), torch_malloc='fast')


def test_the_summary_gives_a_ratio_per_pytorch_side_measured():
  setting = torch_comparison.Setting('cifar', 'mobilenet_v1', 1.0)
  measurements = [
      {'side': 'torch', 'round': 1, 'train_img_s': 100.0, 'eval_img_s': 500.0},
      {'side': 'torch_tuned', 'round': 1, 'train_img_s': 125.0, 'eval_img_s': 500.0},
      {'side': 'ours', 'round': 1, 'train_img_s': 150.0, 'eval_img_s': 750.0, 'train_compile_s': 3.0},
  ]
  row = torch_comparison.summarize(setting, {'params': 1, 'batch_stats': 1}, measurements)
  assert (row['train_ratio'], row['train_ratio_vs_tuned']) == (1.5, 1.2)
  assert (row['eval_ratio'], row['eval_ratio_vs_tuned']) == (1.5, 1.5)
  header = torch_comparison.format_table([row]).splitlines()[0]
  assert '| PyTorch train | PyTorch (tuned malloc) train | ours train | train ratio | train ratio vs tuned |' \
      in header
  only_tuned = torch_comparison.summarize(setting, {'params': 1, 'batch_stats': 1}, measurements[1:])
  assert 'train_ratio' not in only_tuned and only_tuned['train_ratio_vs_tuned'] == 1.2
  assert 'PyTorch train' not in torch_comparison.format_table([only_tuned]).replace(
      'PyTorch (tuned malloc) train', '')
