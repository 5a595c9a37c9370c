"""The run folder survives damaged checkpoints, failed writes, divergence, kills, concurrent runs.

Each test injects its fault into a folder under tmp_path (issue 15).
"""
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mobilenet.errors import EXIT_CODE, UserError
from mobilenet.experiments import evaluate
from mobilenet.training import checkpointing, run_folder, train
from test_train import ROOT, TRAIN_SCRIPT, cli_flags, saved_state, saved_steps, tiny_config, \
    tree_snapshot, wait_for

EVAL_SCRIPT = str(ROOT / 'scripts' / 'eval.py')


def metric_keys(workdir) -> list[tuple[str, int]]:
  return [(r['split'], r['step']) for r in map(json.loads, (pathlib.Path(workdir) /
                                                             'metrics.jsonl').open())]


def data_files(step_folder) -> list[pathlib.Path]:
  """The array data files of a checkpoint, largest first."""
  return sorted((p for p in pathlib.Path(step_folder).rglob('*') if p.is_file() and
                 p.parent.name == 'd'), key=lambda p: -p.stat().st_size)


# --- Checksums: damage anywhere is detected before a restore ---------------------------------

def _tiny_checkpoint(folder) -> pathlib.Path:
  state = {'w': np.arange(4096, dtype=np.float32), 'b': {'s': np.ones((7, 3), np.float32)}}
  checkpoints = checkpointing.Checkpoints(folder, keep=2)
  checkpoints.save(1, state)
  checkpoints.close()
  return pathlib.Path(folder) / '1'


def test_checksums_catch_truncation_altered_bytes_and_missing_files_in_any_file(tmp_path):
  step = _tiny_checkpoint(tmp_path / 'checkpoints')
  assert checkpointing.verify(step) is None
  files = [p for p in step.rglob('*') if p.is_file() and p.name != checkpointing.MANIFEST_FILE]
  assert len(files) >= 6
  for path in files:
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    for damage in (bytes(damaged), original[:len(original) // 2]):
      path.write_bytes(damage)
      assert checkpointing.verify(step) is not None, path
    path.unlink()
    assert checkpointing.verify(step) is not None, path
    path.write_bytes(original)
    assert checkpointing.verify(step) is None
  (step / checkpointing.MANIFEST_FILE).unlink()
  assert 'no checksums.sha256' in checkpointing.verify(step)


# --- 1 and the corruption: fall back, set aside, save that step again ----------------------------

def _damage(step_folder: pathlib.Path, kind: str) -> None:
  largest = data_files(step_folder)[0]
  if kind == 'truncated':
    largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  elif kind == 'altered':  # Decodes without error: only the checksum notices.
    data = bytearray(largest.read_bytes())
    data[len(data) // 2:len(data) // 2 + 8] = os.urandom(8)
    largest.write_bytes(bytes(data))
  elif kind == 'garbled manifest':
    with open(step_folder / 'default' / 'manifest.ocdbt', 'r+b') as f:
      f.seek(10)
      f.write(os.urandom(300))
  elif kind == 'missing file':
    largest.unlink()


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_set_aside_and_the_run_finishes_again(
    fashion_mnist_data_dir, tmp_path, caplog):
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=6, checkpoint_every_steps=1,
                       log_every_steps=1, keep_checkpoints=3)
  workdir = tmp_path / 'run'
  first = train.train_and_evaluate(config, str(workdir))
  final = saved_state(workdir, 6)
  clean_keys = metric_keys(workdir)
  for round_, kind in enumerate(('truncated', 'altered', 'garbled manifest', 'missing file')):
    _damage(workdir / 'checkpoints' / '6', kind)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      again = train.train_and_evaluate(config, str(workdir))
    assert 'checkpoint 6' in caplog.text and 'damaged' in caplog.text, kind
    assert saved_steps(workdir) == [4, 5, 6]
    assert checkpointing.verify(workdir / 'checkpoints' / '6') is None
    for a, b in zip(jax.tree.leaves(saved_state(workdir, 6)), jax.tree.leaves(final)):
      np.testing.assert_array_equal(a, b)  # Step 6 trained again from 5: bitwise the same.
    set_aside = sorted(p.name for p in (workdir / 'checkpoints' / 'damaged').iterdir())
    assert len(set_aside) == round_ + 1, set_aside  # Kept, never deleted.
    assert metric_keys(workdir) == clean_keys, kind
    assert again['top1'] == first['top1']


def test_no_intact_checkpoint_is_refused_and_nothing_is_moved(tmp_path):
  step = _tiny_checkpoint(tmp_path / 'checkpoints')
  _damage(step, 'altered')
  before = tree_snapshot(tmp_path)
  checkpoints = checkpointing.Checkpoints(tmp_path / 'checkpoints')
  abstract = checkpointing.abstract_like(
      {'w': np.zeros(4096, np.float32), 'b': {'s': np.zeros((7, 3), np.float32)}},
      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  with pytest.raises(UserError, match='none of the checkpoints') as error:
    checkpoints.restore_latest(abstract)
  assert '\n' not in str(error.value) and 'checksum' in str(error.value)
  checkpoints.close()
  assert tree_snapshot(tmp_path) == before


def test_a_run_folder_from_before_checksums_resumes_and_adopts_its_checkpoint(tmp_path):
  """No checkpoint has a manifest (written by an earlier version): restored unverified, then sealed."""
  step = _tiny_checkpoint(tmp_path / 'checkpoints')
  (step / checkpointing.MANIFEST_FILE).unlink()
  abstract = checkpointing.abstract_like(
      {'w': np.zeros(4096, np.float32), 'b': {'s': np.zeros((7, 3), np.float32)}},
      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  reader = checkpointing.Checkpoints(tmp_path / 'checkpoints', read_only=True)
  state = reader.restore_latest(abstract)
  reader.close()
  np.testing.assert_array_equal(state['w'], np.arange(4096, dtype=np.float32))
  assert not (step / checkpointing.MANIFEST_FILE).exists()  # Evaluation writes nothing.
  checkpoints = checkpointing.Checkpoints(tmp_path / 'checkpoints')
  checkpoints.restore_latest(abstract)
  checkpoints.close()
  assert checkpointing.verify(step) is None  # Adopted: verified from now on.


def test_an_intact_checkpoint_of_another_state_is_refused_naming_the_fix(tmp_path):
  _tiny_checkpoint(tmp_path / 'checkpoints')
  other = checkpointing.abstract_like(
      {'w': np.zeros(8192, np.float32), 'b': {'s': np.zeros((7, 3), np.float32)}},
      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  checkpoints = checkpointing.Checkpoints(tmp_path / 'checkpoints')
  with pytest.raises(UserError, match='intact but does not fit') as error:
    checkpoints.restore_latest(other)
  checkpoints.close()
  assert '\n' not in str(error.value) and saved_steps(tmp_path) == [1]


# --- 2: the divergence guard ---------------------------------------------------------------------

@pytest.mark.parametrize('overrides', [
    {'optimizer.learning_rate': 1e6, 'log_every_steps': 5, 'checkpoint_every_steps': 5},
    {'optimizer.learning_rate': 1e30, 'log_every_steps': 1, 'checkpoint_every_steps': 1},
], ids=['exploding', 'nan'])
@pytest.mark.slow
def test_divergence_keeps_only_a_state_that_is_finite_and_evaluates(overrides,
                                                                     fashion_mnist_data_dir,
                                                                     tmp_path):
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=20, **overrides)
  workdir = tmp_path / 'run'
  with pytest.raises(UserError, match='NaN or infinite') as error:
    train.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert 'step None' not in message and '\n' not in message
  steps = saved_steps(workdir)
  if steps:
    assert f'checkpoint (step {steps[-1]}) is kept' in message
    state = saved_state(workdir)
    for leaf in jax.tree.leaves((state['params'], state['batch_stats'])):
      assert np.all(np.isfinite(leaf)) and np.max(np.abs(leaf)) < 1e6
    row = evaluate.evaluate_run(str(workdir), train.parallel.create_mesh())
    assert row.status == 'ok' and np.isfinite(row.loss), row
  else:
    assert 'starts from step 0' in message
  # A rerun with a sane learning rate resumes from what was kept and finishes.
  config.optimizer.learning_rate = 0.1
  assert train.train_and_evaluate(config, str(workdir))['examples'] == 10_000


def _guarded_state(small_params: int, large_params: int):
  from mobilenet.training import train_step  # pylint: disable=g-import-not-at-top
  leaves = {'small': np.ones(small_params, np.float32), 'large': np.ones(large_params, np.float32)}
  return train_step.TrainState(step=np.int32(1), params=leaves, batch_stats={'mean': np.zeros(4)},
                               opt_state=(np.int32(3), dict(leaves)), ema_params=None)


@pytest.mark.parametrize('where', ['small', 'large'])
def test_divergence_names_the_first_bad_part_of_a_step_in_small_and_large_leaves(where):
  from mobilenet.training import train_step  # pylint: disable=g-import-not-at-top
  # One leaf on each side of the size below which leaves are checked as one concatenated vector.
  small, large = 3, 2 * train_step._SMALL_LEAF  # pylint: disable=protected-access
  state = _guarded_state(small, large)
  grads = jax.tree.map(np.zeros_like, state.params)
  code = lambda loss, grads, state: int(train_step.divergence(np.float32(loss), grads, state, 10))
  assert code(2.3, grads, state) == 0
  assert code(np.nan, grads, state) == 1
  assert code(1e4, grads, state) == 2
  for bad in (np.nan, np.inf, 1e20):  # 1e20 squared leaves float32: the norm is infinite.
    grads[where][-1] = bad
    assert code(2.3, grads, state) == 3, bad
    grads[where][-1] = 0
  state.params[where][0] = np.inf
  assert code(2.3, grads, state) == 4
  state.params[where][0] = 1
  state.opt_state[1][where][1] = np.nan
  assert code(2.3, grads, state) == 4
  state.opt_state[1][where][1] = 1
  state.batch_stats['mean'][2] = np.nan
  assert code(2.3, grads, state) == 5


@pytest.mark.slow
def test_eval_reports_a_state_with_non_finite_statistics_as_diverged(one_step_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(one_step_run, workdir)
  state = saved_state(workdir, 1)
  state['batch_stats'] = jax.tree.map(lambda leaf: np.full_like(leaf, np.nan),
                                      state['batch_stats'])
  state['step'] = np.asarray(2, state['step'].dtype)
  checkpoints = checkpointing.Checkpoints(workdir / 'checkpoints', keep=3)
  checkpoints.save(2, state)  # As the unguarded trainer used to keep it (issue 15).
  checkpoints.close()
  row = evaluate.evaluate_run(str(workdir), train.parallel.create_mesh())
  assert row.status.startswith('diverged') and row.step == 2 and row.top1 is None
  evaluate.write_records([row], tmp_path)

  def no_nan(text):
    raise AssertionError(f'{text} in results.jsonl')

  assert json.loads((tmp_path / 'results.jsonl').read_text(), parse_constant=no_nan)['loss'] is None


# --- 3 and 4: kill -9 leaves each (split, step) once and the final eval row ---------------------

@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_metrics_of_an_uninterrupted_run(fashion_mnist_data_dir,
                                                                     tmp_path):
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=200, checkpoint_every_steps=40,
                       log_every_steps=1)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  workdir = tmp_path / 'killed'
  metrics_file = workdir / 'metrics.jsonl'

  def rows_past_a_checkpoint():
    steps = saved_steps(workdir)
    return steps and metrics_file.exists() and any(
        r['step'] > steps[-1] + 3 for r in map(json.loads, metrics_file.read_text().splitlines()
                                               [:-1]))

  process = subprocess.Popen([sys.executable, TRAIN_SCRIPT, *cli_flags(config), '--workdir',
                              str(workdir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  try:
    wait_for(rows_past_a_checkpoint, 240, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
  finally:
    process.kill()
  assert saved_steps(workdir)[-1] < 200
  train.train_and_evaluate(config, str(workdir))
  keys = metric_keys(workdir)
  assert keys == metric_keys(tmp_path / 'straight') and len(keys) == len(set(keys))
  straight = [json.loads(l) for l in (tmp_path / 'straight' / 'metrics.jsonl').open()]
  resumed = [json.loads(l) for l in metrics_file.open()]
  assert [r.get('loss') for r in resumed] == [r.get('loss') for r in straight]
  assert (workdir / run_folder.DROPPED_METRICS_FILE).exists()  # Moved, not deleted.


@pytest.mark.slow
def test_final_eval_row_lost_to_a_kill_is_written_and_printed_by_the_rerun(
    fashion_mnist_data_dir, tmp_path, caplog):
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=4)
  workdir = tmp_path / 'run'
  first = train.train_and_evaluate(config, str(workdir))
  # The state a kill -9 leaves after checkpoint 4 is committed and before its eval row.
  metrics_file = workdir / 'metrics.jsonl'
  lines = metrics_file.read_text().splitlines()
  assert '"eval"' in lines[-1]
  metrics_file.write_text(''.join(line + '\n' for line in lines[:-1]))
  for _ in range(2):  # The rerun writes it back; the next one only prints it.
    caplog.clear()
    with caplog.at_level(logging.INFO):
      result = train.train_and_evaluate(config, str(workdir))
    assert result['top1'] == first['top1']
    assert f"eval at step 4: top-1 {first['top1']:.4f}" in caplog.text
    assert metric_keys(workdir).count(('eval', 4)) == 1


# --- 5, 6, 7: what a resume may change, and input that is refused changes nothing ---------------

@pytest.mark.slow
def test_resume_refuses_state_and_data_changes_and_accepts_implementation_changes(
    fashion_mnist_data_dir, tmp_path):
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=4)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  before = tree_snapshot(workdir)
  for field, value in [('batch_size', 64), ('dataset', 'cifar10'), ('seed', 1),
                       ('model.conv_type', 'standard'), ('optimizer.name', 'adamw'),
                       ('ema_decay', 0.99)]:
    changed = tiny_config(fashion_mnist_data_dir, num_train_steps=4, **{field: value})
    with pytest.raises(UserError) as error:
      run_folder.check_resume(workdir, changed)
    assert f'different config.{field}' in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(UserError, match='different config.batch_size'):
    train.train_and_evaluate(tiny_config(fashion_mnist_data_dir, num_train_steps=4,
                                         batch_size=64), str(workdir))
  assert tree_snapshot(workdir) == before
  saved = (workdir / 'config.json').read_text()
  accepted = tiny_config(fashion_mnist_data_dir, num_train_steps=6, log_every_steps=1, **{
      'model.depthwise_implementation': 'shifted', 'model.fused_inference': False})
  train.train_and_evaluate(accepted, str(workdir))
  assert saved_steps(workdir)[-1] == 6
  assert json.loads((workdir / 'config.json').read_text())['model']['fused_inference'] is False
  history = [json.loads(l) for l in (workdir / run_folder.CONFIG_HISTORY_FILE).open()]
  assert [entry['config_json'] for entry in history] == [saved]  # The replaced one is kept.


@pytest.fixture(scope='module')
def one_step_run(fashion_mnist_data_dir, tmp_path_factory) -> pathlib.Path:
  """A finished one-step run, trained once for the tests that copy it."""
  workdir = tmp_path_factory.mktemp('one_step') / 'run'
  train.train_and_evaluate(tiny_config(fashion_mnist_data_dir, num_train_steps=1), str(workdir))
  return workdir


@pytest.mark.parametrize('overrides,named', [
    ({'batch_size': 100_000}, 'batch_size'),
    ({'model.width_multiplier': float('inf')}, 'config.model.width_multiplier'),
    ({'model.width_multiplier': 1e6}, 'config.model.width_multiplier'),
    ({'model.resolution': 10_000}, 'config.model.resolution'),
    ({'model.resolution': 4096, 'batch_size': 4096}, 'needs about'),
], ids=['batch over the split', 'infinite width', 'huge width', 'huge resolution',
        'more memory than the machine'])
@pytest.mark.slow
def test_refused_input_leaves_an_existing_run_and_a_new_path_untouched(
    overrides, named, one_step_run, fashion_mnist_data_dir, tmp_path):
  existing = tmp_path / 'run'
  shutil.copytree(one_step_run, existing)
  before = tree_snapshot(existing)
  for workdir in (existing, tmp_path / 'new' / 'run'):
    started = time.perf_counter()
    with pytest.raises(UserError) as error:
      train.train_and_evaluate(tiny_config(fashion_mnist_data_dir, **overrides), str(workdir))
    assert named in str(error.value) and '\n' not in str(error.value)
    assert time.perf_counter() - started < 30  # Before compiling anything.
  assert tree_snapshot(existing) == before
  assert not (tmp_path / 'new').exists()


@pytest.mark.slow
def test_a_start_that_crashed_before_its_first_checkpoint_does_not_block_the_fixed_command(
    fashion_mnist_data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  wrong = tiny_config(fashion_mnist_data_dir, num_train_steps=2, **{'model.width_multiplier': 0.5})

  def crash(*args, **kwargs):
    raise RuntimeError('injected crash at start-up')

  with monkeypatch.context() as patch:
    patch.setattr(train, 'create_train_state', crash)
    with pytest.raises(RuntimeError, match='injected'):
      train.train_and_evaluate(wrong, str(workdir))
  assert (workdir / 'config.json').exists() and not saved_steps(workdir)
  fixed = tiny_config(fashion_mnist_data_dir, num_train_steps=2)
  train.train_and_evaluate(fixed, str(workdir))
  assert saved_steps(workdir) == [2]
  assert json.loads((workdir / 'config.json').read_text())['model']['width_multiplier'] == 0.25


# --- 9: data_dir ---------------------------------------------------------------------------------

def test_a_data_dir_that_is_a_file_or_read_only_is_one_line(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  if os.geteuid() == 0:  # Root writes through permissions: make the file system read-only.
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', str(read_only)],
                   check=True)
  else:
    read_only.chmod(0o555)
  try:
    for data_dir, named in [(a_file, 'is a file'), (a_file / 'sub', 'is a file'),
                            (read_only, 'not writable')]:
      with pytest.raises(UserError, match=named) as error:
        train.train_and_evaluate(tiny_config(str(data_dir)), str(tmp_path / 'run'))
      assert '\n' not in str(error.value) and 'config.data_dir' in str(error.value)
  finally:
    if os.geteuid() == 0:
      subprocess.run(['umount', str(read_only)], check=True)
  assert not (tmp_path / 'run').exists()


# --- 10: one trainer per workdir ------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_ones_lock_does_not_block(
    fashion_mnist_data_dir, tmp_path):
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=100_000, checkpoint_every_steps=50,
                       log_every_steps=10)
  workdir = tmp_path / 'run'
  process = subprocess.Popen([sys.executable, TRAIN_SCRIPT, *cli_flags(config), '--workdir',
                              str(workdir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  try:
    wait_for(lambda: (workdir / 'metrics.jsonl').exists(), 240, process)
    before = (workdir / 'config.json').read_text()
    started = time.perf_counter()
    with pytest.raises(UserError, match='in use by another trainer') as error:
      train.train_and_evaluate(tiny_config(fashion_mnist_data_dir, num_train_steps=4),
                               str(workdir))
    assert f'pid {process.pid}' in str(error.value) and '\n' not in str(error.value)
    assert time.perf_counter() - started < 20
    assert (workdir / 'config.json').read_text() == before
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
  finally:
    process.kill()
  # The killed trainer's lock file is still there; the kernel released its lock.
  assert (workdir / run_folder.LOCK_FILE).exists()
  end = (saved_steps(workdir) or [0])[-1] + 2
  train.train_and_evaluate(tiny_config(fashion_mnist_data_dir, num_train_steps=end,
                                       checkpoint_every_steps=50, log_every_steps=10), str(workdir))
  assert saved_steps(workdir)[-1] == end


# --- 11: checkpoint writes that fail -------------------------------------------------------------

def _fail_at_second_save(monkeypatch, action):
  """Runs `action(checkpoints_folder)` just before the run's second checkpoint is written."""
  original = checkpointing.Checkpoints.save
  calls = []

  def save(self, step, state):
    calls.append(step)
    if len(calls) == 2:
      self.wait()
      action(self._directory)
    return original(self, step, state)

  monkeypatch.setattr(checkpointing.Checkpoints, 'save', save)


_PROBE_LOOP = """
import sys
import numpy as np
from mobilenet.training import checkpointing
checkpoints = checkpointing.Checkpoints(sys.argv[1])
problems = {checkpoints.write_problem(1, {'w': np.zeros(4, np.float32)}) for _ in range(1500)}
print(problems - {None} or 'none')
"""


def test_hosts_checking_a_shared_folder_at_once_never_see_a_false_failure(tmp_path):
  """Every host checks the folder before a collective save, at the same moment; with one shared
  probe file a host could delete another's between its write and its removal (about 1% of checks
  on two cores) and stop alone, leaving the others in Orbax's save barrier."""
  folder = tmp_path / 'checkpoints'
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  hosts = [subprocess.Popen([sys.executable, '-c', _PROBE_LOOP, str(folder)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  for host in hosts:
    out, err = host.communicate(timeout=120)
    assert host.returncode == 0, err[-2000:]
    assert out.strip() == 'none', out


@pytest.mark.slow
@pytest.mark.parametrize('fault,named', [
    ('deleted', 'deleted'), ('immutable', 'not writable'), ('full disk', 'disk'),
    ('full disk mid-write', 'disk is full')])
def test_failed_checkpoint_writes_are_one_line_and_keep_the_last_good_one(
    fault, named, fashion_mnist_data_dir, tmp_path, monkeypatch, request):
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=12, checkpoint_every_steps=4)
  workdir = tmp_path / 'run'
  mounted = fault.startswith('full disk')
  disk_usage = shutil.disk_usage  # The real one, also once the test replaces it.
  if mounted:  # A small file system of its own, filled up before the second checkpoint.
    workdir.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=12m', 'tmpfs', str(workdir)], check=True)
    request.addfinalizer(lambda: subprocess.run(['umount', '-l', str(workdir)], check=True))
  actions = {
      'deleted': lambda folder: shutil.rmtree(folder),
      'immutable': lambda folder: subprocess.run(['chattr', '+i', str(folder)], check=True),
      'full disk': lambda folder: (folder.parent / 'filler').write_bytes(
          b'0' * int(disk_usage(folder).free - (1 << 20))),
      'full disk mid-write': lambda folder: (folder.parent / 'filler').write_bytes(
          b'0' * int(disk_usage(folder).free - (64 << 10))),
  }
  _fail_at_second_save(monkeypatch, actions[fault])
  if fault == 'full disk mid-write':  # Past the free-space check: Orbax itself hits ENOSPC.
    monkeypatch.setattr(checkpointing.shutil, 'disk_usage',
                        lambda path: disk_usage(path)._replace(free=1 << 40))
  try:
    started = time.perf_counter()
    with pytest.raises(UserError) as error:
      train.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert named in message and '\n' not in message, message
    assert time.perf_counter() - started < 120
    if fault != 'deleted':
      assert 'checkpoint (4) is kept' in message
      assert saved_steps(workdir) == [4]
      assert checkpointing.verify(workdir / 'checkpoints' / '4') is None
      assert not [p for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name]
  finally:
    if fault == 'immutable':
      subprocess.run(['chattr', '-i', str(workdir / 'checkpoints')], check=True)
    if mounted:
      (workdir / 'filler').unlink(missing_ok=True)
  if fault == 'full disk mid-write':  # Once there is room, the same command finishes the run.
    monkeypatch.undo()
    assert train.train_and_evaluate(config, str(workdir))['examples'] == 10_000
    assert saved_steps(workdir)[-1] == 12


# --- 12, 13: config-file causes, eval.py ----------------------------------------------------------

def test_count_params_refuses_an_infinite_width_with_one_line():
  result = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'count_params.py'), '--config',
                           'configs/default.py', '--config.model.width_multiplier=inf'],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == EXIT_CODE and 'Traceback' not in result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'config.model.width_multiplier=inf' in lines[0]


def test_config_file_errors_keep_their_cause(tmp_path):
  result = subprocess.run([sys.executable, TRAIN_SCRIPT, '--config', 'configs/cifar10.py:abc',
                           '--workdir', str(tmp_path / 'run')], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
  assert result.returncode == EXIT_CODE
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and "could not convert string to float: 'abc'" in lines[0], result.stderr
  assert 'cifar10.py' in lines[0] and not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_eval_fails_for_nothing_evaluated_and_reads_damaged_runs_quietly(fashion_mnist_data_dir,
                                                                        tmp_path):
  typo = tmp_path / 'typo' / 'runs' / 'a'
  result = subprocess.run([sys.executable, EVAL_SCRIPT, '--workdir', str(typo)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == EXIT_CODE, result.stderr[-2000:]
  assert not (tmp_path / 'typo').exists()

  runs = tmp_path / 'runs'
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=4, checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(runs / 'good'))
  shutil.copytree(runs / 'good', runs / 'damaged')
  _damage(runs / 'damaged' / 'checkpoints' / '4', 'truncated')
  before = tree_snapshot(runs / 'damaged')
  result = subprocess.run([sys.executable, EVAL_SCRIPT, '--workdir', str(runs / '*')],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Event loop is closed' not in result.stderr and 'Traceback' not in result.stderr
  rows = {pathlib.Path(r['workdir']).name: r for r in map(json.loads,
                                                          (runs / 'results.jsonl').open())}
  assert rows['good']['step'] == 4 and rows['damaged']['step'] == 2
  assert rows['damaged']['status'] == 'ok'
  assert tree_snapshot(runs / 'damaged') == before  # Evaluation moves nothing.
