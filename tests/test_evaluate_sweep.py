"""Sweep and comparison end to end on real Fashion-MNIST, with two tiny variants.

The sweep trains in subprocesses (scripts/train.py, 4 steps each); everything
else runs in this process to stay fast.
"""
import contextlib
import csv
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from matplotlib import image as mpimg

from mobilenet.models import counting
from mobilenet.experiments import evaluate, sweep
from mobilenet.data import fashion_mnist_offline
from mobilenet.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / 'configs' / 'default.py')
WIDTHS = '0.5,0.25'  # Descending, so that sorting by parameters reverses the grid's order.

needs_data = pytest.mark.skipif(not fashion_mnist_offline.debian_files_available(),
                                reason='needs the Debian package dataset-fashion-mnist')


def _passthrough(data_dir):
  """Tiny runs: 4 steps of 32 at 16 pixels, one-pass eval in 10 batches."""
  return {'data_dir': data_dir, 'num_train_steps': 4, 'batch_size': 32,
          'eval_batch_size': 1000, 'model.resolution': 16}


def _config(passthrough):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  for field, value in passthrough.items():
    *parents, leaf = field.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@pytest.fixture(scope='module')
def finished_sweep(fashion_mnist_data_dir, tmp_path_factory):
  """A two-variant width sweep trained and compared once: (sweep dir, config, stdout)."""
  sweep_dir = tmp_path_factory.mktemp('sweep')
  passthrough = _passthrough(fashion_mnist_data_dir)
  config = _config(passthrough)
  out = io.StringIO()  # Module-scoped: capsys is per test, so capture the sweep's lines here.
  with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as patch:
    # The variants inherit the environment: 4 steps need no optimized code, only a fast compile.
    patch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
    failed = sweep.run_sweep(config, DEFAULT_CONFIG, str(sweep_dir),
                             [f'model.width_multiplier={WIDTHS}'], passthrough)
  assert failed == []
  return sweep_dir, config, out.getvalue()


def test_parse_axes_and_variant_names(tmp_path):
  axes = sweep.parse_axes(['model.width_multiplier=0.25,0.5', 'model.resolution=28;seed=1,2'])
  assert axes == [('model.width_multiplier', ['0.25', '0.5']), ('model.resolution', ['28']),
                  ('seed', ['1', '2'])]
  grid = sweep.variants(axes, tmp_path)
  assert len(grid) == 4
  assert grid[0].workdir == tmp_path / 'width_multiplier=0.25,resolution=28,seed=1'
  assert grid[-1].overrides == (('model.width_multiplier', '0.5'), ('model.resolution', '28'),
                                ('seed', '2'))
  with pytest.raises(UserError, match='field=value'):
    sweep.parse_axes(['model.width_multiplier'])


def test_expand_workdirs_globs_folders_and_keeps_unmatched_paths(tmp_path):
  for name in ('b', 'a'):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text('{}')
  (tmp_path / 'tensorboard').mkdir()  # The comparison's own output: not a run.
  (tmp_path / 'c.txt').write_text('')
  found = evaluate.expand_workdirs([str(tmp_path / '*'), str(tmp_path / 'a'), 'nowhere',
                                    str(tmp_path / 'none*')])
  assert found == [str(tmp_path / 'a'), str(tmp_path / 'b'), 'nowhere', str(tmp_path / 'none*')]
  assert evaluate.default_output_dir(found[:2]) == str(tmp_path)


def test_bad_sweep_fields_and_values_fail_before_anything_runs(tmp_path):
  config = _config({})
  with pytest.raises(UserError, match='does not have'):
    sweep.run_sweep(config, DEFAULT_CONFIG, str(tmp_path), ['model.widht=1'], {}, dry_run=True)
  with pytest.raises(UserError, match='does not fit'):
    sweep.run_sweep(config, DEFAULT_CONFIG, str(tmp_path), ['model.resolution=0.5'], {},
                    dry_run=True)


@pytest.mark.slow
def test_dry_run_script_prints_one_command_per_variant_and_runs_nothing(tmp_path):
  sweep_dir = tmp_path / 'sweep'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'sweep.py'), f'--config={DEFAULT_CONFIG}',
       f'--workdir={sweep_dir}', '--sweep', 'model.width_multiplier=0.25,0.5',
       '--sweep=model.resolution=16,20', '--config.num_train_steps=4', '--dry_run'],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 4
  assert 'train.py' in lines[0] and '--config.num_train_steps=4' in lines[0]
  assert f'--workdir={sweep_dir}/width_multiplier=0.25,resolution=16' in lines[0]
  assert lines[3].endswith('--config.model.width_multiplier=0.5 --config.model.resolution=20')
  assert not sweep_dir.exists()


def test_ablation_configs_carry_a_valid_default_grid(tmp_path, capsys):
  expected = {'fashion_mnist_width_sweep': 4, 'fashion_mnist_resolution_sweep': 4,
              'fashion_mnist_conv_vs_separable': 2, 'fashion_mnist_family': 3}
  for name, count in expected.items():
    module = __import__(f'configs.{name}', fromlist=['get_config'])
    config = module.get_config()
    sweep.run_sweep(config, f'configs/{name}.py', str(tmp_path / name), [], {}, dry_run=True)
    assert len(capsys.readouterr().out.strip().splitlines()) == count
  assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_failing_variant_is_reported_and_the_others_run(tmp_path, monkeypatch, capsys):
  calls = []

  def fake_call(command):
    calls.append(command)
    return 1 if '--config.model.width_multiplier=0.5' in command else 0

  monkeypatch.setattr(sweep.subprocess, 'call', fake_call)
  monkeypatch.setattr(sweep.evaluate, 'evaluate_runs', lambda workdirs, output: ('table', []))
  failed = sweep.run_sweep(_config({}), DEFAULT_CONFIG, str(tmp_path),
                           ['model.width_multiplier=0.5,0.25'], {})
  assert [v.workdir.name for v in failed] == ['width_multiplier=0.5']
  assert len(calls) == 2
  out = capsys.readouterr().out
  assert '[1/2] width_multiplier=0.5: FAILED' in out and '[2/2] width_multiplier=0.25: done' in out


@pytest.mark.slow
@needs_data
def test_sweep_trains_every_variant_and_writes_the_comparison(finished_sweep):
  sweep_dir, config, log = finished_sweep
  assert '[1/2] width_multiplier=0.5: started' in log
  assert '[2/2] width_multiplier=0.25: started' in log
  with open(sweep_dir / 'results.csv', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert [row['width_multiplier'] for row in rows] == ['0.25', '0.5']  # Sorted by parameters.
  for row in rows:
    variant = sweep.apply_overrides(config, (('model.width_multiplier', row['width_multiplier']),))
    counts = counting.totals(counting.model_layer_specs(variant))
    assert int(row['params']) == counts.params and int(row['mult_adds']) == counts.mult_adds
    assert row['status'] == 'ok' and int(row['step']) == 4 and row['resolution'] == '16'
    assert int(row['examples']) == 10_000
    assert 0 <= float(row['top1']) <= float(row['top5']) <= 1
  records = [json.loads(line) for line in (sweep_dir / 'results.jsonl').read_text().splitlines()]
  assert [r['params'] for r in records] == [int(row['params']) for row in rows]
  for name in ('accuracy_vs_params.png', 'accuracy_vs_mult_adds.png'):
    assert (sweep_dir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert mpimg.imread(sweep_dir / name).ndim == 3
  assert any((sweep_dir / 'tensorboard').iterdir())
  table = log[log.index('| run |'):].splitlines()
  assert table[2].startswith('| width_multiplier=0.25 |')
  assert table[3].startswith('| width_multiplier=0.5 |')


@pytest.mark.slow
@needs_data
def test_rerunning_the_sweep_skips_finished_variants(finished_sweep, monkeypatch, capsys):
  sweep_dir, config, _ = finished_sweep

  def no_training(command):
    raise AssertionError(f'a finished variant was trained again: {command}')

  monkeypatch.setattr(sweep.subprocess, 'call', no_training)
  monkeypatch.setattr(sweep.evaluate, 'evaluate_runs', lambda workdirs, output: ('table', []))
  assert sweep.run_sweep(config, DEFAULT_CONFIG, str(sweep_dir),
                         [f'model.width_multiplier={WIDTHS}'], {}) == []
  out = capsys.readouterr().out
  assert '[1/2] width_multiplier=0.5: finished, skipped' in out
  assert '[2/2] width_multiplier=0.25: finished, skipped' in out
  longer = _config({**_passthrough(config.data_dir), 'num_train_steps': 8})
  variant = sweep.variants([('model.width_multiplier', ['0.25'])], sweep_dir)[0]
  assert sweep.variant_state(longer, variant) == 'resume'


@pytest.mark.slow
@needs_data
def test_runs_without_a_checkpoint_or_config_are_reported_and_others_evaluate(
    finished_sweep, tmp_path):
  sweep_dir, _, _ = finished_sweep
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  (tmp_path / 'no_config').mkdir()
  shutil.copy(sweep_dir / 'width_multiplier=0.25' / 'config.json', untrained)
  output = tmp_path / 'out'
  table, results = evaluate.evaluate_runs(
      [str(sweep_dir / 'width_multiplier=0.2*'), str(untrained), str(tmp_path / 'no_config'),
       str(tmp_path / 'missing')],
      str(output))
  status = {os.path.basename(r.workdir): r.status for r in results}
  assert status == {'width_multiplier=0.25': 'ok', 'untrained': 'no checkpoint',
                    'no_config': 'no config.json',
                    'missing': 'no such folder'}
  assert '| untrained | mobilenet_v1 | 0.25 | 16 | separable |' in table and 'no checkpoint |' in table
  assert table.splitlines()[-1].startswith('| no_config |')  # No counts: last, by name.
  with open(output / 'results.csv', encoding='utf-8') as f:
    assert len(list(csv.DictReader(f))) == 4
  assert (output / 'accuracy_vs_params.png').exists()


@pytest.mark.slow
def test_layer_timing_covers_every_layer_and_shares_sum_to_one():
  from configs import cifar10
  from mobilenet.bench import layer_timing
  from mobilenet.models import counting
  config = cifar10.get_config()
  config.batch_size, config.model.resolution, config.model.width_multiplier = 2, 8, 0.25
  rows = list(layer_timing.time_layers(config, warmup=0, steps=1))
  specs = counting.model_layer_specs(config)
  # Every convolution, its BatchNorm, and the classifier, in network order.
  assert [row['layer'] for row in rows][:4] == ['stem/conv', 'stem/conv_bn', 'block_01/depthwise',
                                                 'block_01/depthwise_bn']
  assert len(rows) == 2 * (len(specs) - 1) + 1
  assert all(row['ms'] > 0 for row in rows)
  summary = layer_timing.summarize(rows, config, train_step_ms=1.0)
  assert sum(summary[f'{kind}_share'] for kind in layer_timing.KINDS) == pytest.approx(1, abs=0.01)
  assert summary['depthwise_ms'] == pytest.approx(
      sum(row['ms'] for row in rows if row['kind'] == 'depthwise'), abs=0.01)


def test_family_comparison_draws_one_series_per_architecture(tmp_path):
  """A sweep over model.name: rows carry the architecture; each plot has a series per architecture."""
  results = [evaluate.RunResult(f'runs/{name}_{alpha}', architecture=name, width_multiplier=alpha,
                                resolution=28, conv_type='separable', params=params,
                                mult_adds=10 * params, top1=top1, top5=0.99)
             for name, alpha, params, top1 in (('mobilenet_v2', 1.0, 2_000, 0.9),
                                               ('mobilenet_v1', 0.5, 800, 0.85),
                                               ('mobilenet_v1', 1.0, 3_000, 0.88),
                                               ('mobilenet_v3_small', 1.0, 1_500, 0.87))]
  series = evaluate.series_by_architecture(results, 'params')
  assert list(series) == ['mobilenet_v1', 'mobilenet_v2', 'mobilenet_v3_small']
  assert [r.width_multiplier for r in series['mobilenet_v1']] == [0.5, 1.0]
  evaluate.plot_accuracy(results, 'params', 'parameters', tmp_path / 'plot.png')
  assert mpimg.imread(tmp_path / 'plot.png').ndim == 3
  evaluate.write_records(results, tmp_path)
  with open(tmp_path / 'results.csv', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert [row['architecture'] for row in rows] == [
      'mobilenet_v1', 'mobilenet_v3_small', 'mobilenet_v2', 'mobilenet_v1']
  assert '| mobilenet_v1_0.5 | mobilenet_v1 | 0.5 |' in evaluate.format_table(results)
