"""The console side of a run: progress display, first-call logging, the end-of-run summary,
and the third-party log defaults."""
import logging
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet import third_party_logs
from mobilenet.training import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


class FakeClock:
  """Stands in for time.perf_counter: advances only when told to."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  fake = FakeClock()
  monkeypatch.setattr(metrics.time, 'perf_counter', fake)
  return fake


def log_lines(caplog) -> list[str]:
  return [record.getMessage() for record in caplog.records]


def test_log_lines_rate_leaves_out_the_first_step_and_eval(clock, caplog):
  caplog.set_level(logging.INFO)
  progress = metrics.Progress(total_steps=100, initial_step=0, batch_size=10)
  clock.now += 60.0  # The first step: compiling.
  progress.advance(1)
  clock.now += 9.0  # Steps 2..10: 1 step/s.
  progress.report(10, 'loss 1')
  with progress.paused():
    clock.now += 500.0  # Eval.
  clock.now += 10.0  # Steps 11..20.
  progress.report(20, 'loss 2')
  lines = [line for line in log_lines(caplog) if line.startswith('step ')]
  assert lines[0].startswith('step 10/100 (10%) 1.0 steps/s, 10 img/s, ETA 1m30s | loss 1')
  assert lines[1].startswith('step 20/100 (20%) 1.0 steps/s, 10 img/s, ETA 1m20s | loss 2')


@pytest.mark.parametrize('columns', [0, 40])
def test_no_bar_on_a_terminal_without_width(monkeypatch, caplog, columns):
  """A terminal reporting 0 (or too few) columns would draw no bar, or a wrapped one: log lines."""
  caplog.set_level(logging.INFO)
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
  monkeypatch.setattr(metrics, 'terminal_columns', lambda: columns)
  progress = metrics.Progress(total_steps=10, initial_step=0, batch_size=1)
  progress.advance(1)
  progress.report(2, 'loss 1')
  progress.close()
  assert progress._bar is None
  assert any(line.startswith('step 2/10') for line in log_lines(caplog))


def test_bar_on_a_wide_terminal_starts_after_the_first_step(monkeypatch, capsys):
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
  monkeypatch.setattr(metrics, 'terminal_columns', lambda: 120)
  progress = metrics.Progress(total_steps=10, initial_step=3, batch_size=1)
  assert progress._bar is None  # Not while the first step compiles.
  progress.advance(4)
  assert progress._bar is not None and progress._bar.n == 4
  progress.report(6, 'loss 1')
  assert progress._bar.n == 6
  progress.close()
  assert 'loss 1' in capsys.readouterr().err


def test_bar_time_leaves_out_eval(monkeypatch, clock):
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
  monkeypatch.setattr(metrics, 'terminal_columns', lambda: 120)
  progress = metrics.Progress(total_steps=100, initial_step=0, batch_size=1)
  progress.advance(1)
  bar = progress._bar
  bar._time = clock  # tqdm's own clock, from here on the fake one.
  bar.start_t = bar.last_print_t = clock()
  clock.now += 10.0
  progress.report(11, 'loss 1')
  with progress.paused():
    clock.now += 500.0
  clock.now += 10.0
  progress.report(21, 'loss 2')
  assert bar.format_dict['elapsed'] == pytest.approx(20.0, abs=0.01)
  progress.close()


def test_terminal_columns_is_zero_off_a_terminal(monkeypatch, tmp_path):
  with open(tmp_path / 'log', 'w') as log_file:
    monkeypatch.setattr(sys, 'stderr', log_file)
    assert metrics.terminal_columns() == 0


def test_log_first_call_logs_compiling_once(caplog):
  caplog.set_level(logging.INFO)
  calls = []
  double = metrics.log_first_call(jax.jit(lambda x: calls.append(1) or 2 * x), 'the doubling',
                                  'instant')
  assert float(double(jnp.float32(2))) == 4.0
  assert float(double(jnp.float32(3))) == 6.0
  lines = log_lines(caplog)
  assert lines[0] == 'Compiling the doubling (instant)...'
  assert lines[1].startswith('Compiled the doubling in ')
  assert len(lines) == 2 and len(calls) == 1  # Traced once, logged once.


def test_compile_ahead_compiles_for_shapes_before_the_inputs_exist(caplog):
  caplog.set_level(logging.INFO)
  spec = jax.ShapeDtypeStruct((3,), jnp.float32)
  double = metrics.compile_ahead(jax.jit(lambda x: 2 * x), (spec,), 'the doubling', 'instant')
  assert log_lines(caplog)[0] == 'Compiling the doubling (instant)...'
  assert log_lines(caplog)[1].startswith('Compiled the doubling in ')
  np.testing.assert_array_equal(double(jnp.arange(3.0)), [0.0, 2.0, 4.0])
  with pytest.raises(TypeError):  # Other shapes are refused, never compiled silently.
    double(jnp.arange(4.0))


def test_run_summary_names_results_outputs_and_the_eval_command(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  workdir = tmp_path / 'runs' / 'default'
  results = {'top1': 0.9107, 'top5': 0.9989, 'examples': 10000.0, 'params': 215498.0,
             'mult_adds': 2895136.0, 'loss': 0.3}
  summary = metrics.run_summary(workdir, results, 352.0, start_step=0, num_steps=4212)
  first, *rest = summary.splitlines()
  assert first == ('Run finished: test top-1 91.07%, top-5 99.89% on 10,000 examples after '
                   '4,212 steps; 215,498 parameters, 2,895,136 mult-adds per image; wall time '
                   '5m52s.')
  text = '\n'.join(rest)
  assert 'runs/default/checkpoints' in text
  assert 'runs/default/metrics.jsonl' in text
  assert '--logdir runs/default/tensorboard' in text
  # The eval command names the real script (by a path from the current folder) and this run.
  eval_line = next(line for line in rest if line.strip().startswith('next'))
  script = eval_line.split()[2]
  assert (tmp_path / script).resolve() == ROOT / 'scripts' / 'eval.py'
  assert '--workdir runs/default' in eval_line
  resumed = metrics.run_summary(workdir, results, 10.0, start_step=4000, num_steps=4212)
  assert 'resumed at step 4,000' in resumed


@pytest.mark.parametrize('vendor, device_class, expected', [
    ('0x10de', '0x030200', True),  # An NVIDIA 3D controller.
    ('0x1ae0', '0x120000', True),  # A Google TPU.
    ('0x1af4', '0x030000', False),  # A virtio display.
    ('0x10de', '0x040300', False),  # NVIDIA audio.
])
def test_accelerator_hardware_reads_the_pci_bus(tmp_path, vendor, device_class, expected):
  device = tmp_path / '0000:00:04.0'
  device.mkdir()
  (device / 'vendor').write_text(vendor + '\n')
  (device / 'class').write_text(device_class + '\n')
  assert third_party_logs.accelerator_hardware(str(tmp_path)) is expected


def test_tfds_filter_drops_only_tfds_info_and_its_harmless_warnings():
  tfds_dir = '/site-packages/tensorflow_datasets'
  keep = third_party_logs.TfdsFilter(tfds_dir).filter

  def record(path, level, message):
    return logging.LogRecord('absl', level, path, 1, message, None, None)

  tfds_file = f'{tfds_dir}/core/dataset_info.py'
  assert not keep(record(tfds_file, logging.INFO, 'Load dataset info from /data'))
  assert not keep(record(tfds_file, logging.WARNING,
                         'Variant folder /data/fashion_mnist/3.0.1 has no dataset_info.json'))
  assert not keep(record(tfds_file, logging.INFO, "For 'fashion_mnist/3.0.1': fields "
                         'info.[module_name] differ on disk and in the code.'))
  assert keep(record(tfds_file, logging.WARNING, 'Checksum mismatch'))
  assert keep(record('/repo/mobilenet/training/train.py', logging.INFO, 'Load dataset info'))


def test_jax_platforms_is_set_only_without_accelerators_and_user_choice(monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.setattr(third_party_logs, 'accelerator_plugins', lambda: [])
  monkeypatch.setattr(third_party_logs, 'accelerator_hardware', lambda: False)
  third_party_logs.apply()
  assert os.environ['JAX_PLATFORMS'] == 'cpu'
  monkeypatch.delenv('JAX_PLATFORMS')
  monkeypatch.setattr(third_party_logs, 'accelerator_hardware', lambda: True)
  third_party_logs.apply()  # A GPU without JAX's plugin: JAX says so itself.
  assert 'JAX_PLATFORMS' not in os.environ
  monkeypatch.setattr(third_party_logs, 'accelerator_hardware', lambda: False)
  monkeypatch.setattr(third_party_logs, 'accelerator_plugins', lambda: ['xla_cuda12'])
  third_party_logs.apply()
  assert 'JAX_PLATFORMS' not in os.environ
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  monkeypatch.setattr(third_party_logs, 'accelerator_plugins', lambda: [])
  third_party_logs.apply()
  assert os.environ['JAX_PLATFORMS'] == 'cuda'
