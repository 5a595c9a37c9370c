"""The trainer end to end: accuracy, bad input, NaN, preemption, kill -9 resume, devices, hosts."""
import concurrent.futures
import importlib.util
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mobilenet.training import config_base, run_folder, train
from mobilenet.experiments import evaluate
from mobilenet.errors import EXIT_CODE, UserError

pytestmark = pytest.mark.slow  # The whole module is the full tier (see pyproject.toml).

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = str(ROOT / 'scripts' / 'train.py')


def tiny_config(data_dir: str, **overrides):
  """A Fashion-MNIST run that takes seconds: alpha 0.25 at 16x16, batch 32."""
  config = config_base.base_config()
  config.data_dir = data_dir
  config.model.width_multiplier = 0.25
  config.model.resolution = 16
  config.batch_size = 32
  config.eval_batch_size = 1000
  config.num_train_steps = 12
  config.log_every_steps = 4
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 1000  # Only at the end.
  config.schedule.warmup_epochs = 0.0
  for dotted, value in overrides.items():
    section = config
    *parents, leaf = dotted.split('.')
    for parent in parents:
      section = section[parent]
    section[leaf] = value
  return config


def flat(config) -> dict:
  """{'model.width_multiplier': 0.25, ...} for every leaf of a config."""
  return {'.'.join(str(key.key) for key in path): value
          for path, value in jax.tree_util.tree_flatten_with_path(config.to_dict())[0]}


def cli_flags(config) -> list[str]:
  """configs/default.py plus the overrides that turn it into `config`, for scripts/train.py."""
  spec = importlib.util.spec_from_file_location('default_config', ROOT / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  default = flat(module.get_config())
  return ['--config', str(ROOT / 'configs' / 'default.py')] + [
      f'--config.{key}={value}' for key, value in flat(config).items() if default.get(key) != value]


def saved_steps(workdir) -> list[int]:
  folder = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def saved_state(workdir, step=None) -> dict:
  """A checkpoint as plain numpy arrays."""
  step = step or saved_steps(workdir)[-1]
  return ocp.PyTreeCheckpointer().restore(pathlib.Path(workdir) / 'checkpoints' / str(step) / 'default')


def tree_snapshot(folder) -> dict:
  """Every file under folder with its size and modification time."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in folder.rglob('*')} if folder.exists() else {}


def test_default_config_trains_to_real_accuracy(fashion_mnist_data_dir, tmp_path):
  """300 steps of alpha 0.25 at 28x28 on the real data: well above chance (10%)."""
  config = tiny_config(fashion_mnist_data_dir, **{
      'model.resolution': 28, 'batch_size': 128, 'num_train_steps': 300,
      'log_every_steps': 100, 'checkpoint_every_steps': 300, 'schedule.warmup_epochs': 0.1})
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['examples'] == 10_000
  assert result['top1'] >= 0.75, result
  records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').open()]
  assert {'model', 'train', 'eval'} <= {record['split'] for record in records}
  assert all('step' in record for record in records)
  assert records[0]['params'] == result['params']
  train_records = [r for r in records if r['split'] == 'train']
  assert train_records[-1]['loss'] < train_records[0]['loss']
  assert list((tmp_path / 'run' / 'tensorboard').iterdir())


BAD_CONFIGS = {
    'unknown dataset': ({'dataset': 'mnist'}, 'config.dataset'),
    'unknown optimizer': ({'optimizer.name': 'lamb'}, 'config.optimizer.name'),
    'zero width': ({'model.width_multiplier': 0.0}, 'config.model.width_multiplier'),
    'negative width': ({'model.width_multiplier': -0.5}, 'config.model.width_multiplier'),
    'zero batch': ({'batch_size': 0}, 'config.batch_size'),
    'negative learning rate': ({'optimizer.learning_rate': -0.1}, 'config.optimizer.learning_rate'),
    'unknown schedule': ({'schedule.name': 'linear'}, 'config.schedule.name'),
    'unknown depthwise kernel': ({'model.depthwise_implementation': 'cuda'},
                                 'config.model.depthwise_implementation'),
    'two input channels': ({'input.channels': 2}, 'config.input.channels'),
    'wrong class count': ({'model.num_classes': 100}, 'config.model.num_classes'),
    'tiny resolution': ({'model.resolution': 4}, 'config.model.resolution'),
    'no steps': ({'num_train_steps': 0}, 'config.num_train_steps'),
}


@pytest.mark.parametrize('case', sorted(BAD_CONFIGS))
def test_bad_config_values_fail_with_one_line_and_touch_nothing(case, fashion_mnist_data_dir,
                                                                tmp_path):
  overrides, named = BAD_CONFIGS[case]
  workdir = tmp_path / 'run'
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(tiny_config(fashion_mnist_data_dir, **overrides), str(workdir))
  message = str(error.value)
  assert named in message and '\n' not in message
  assert not workdir.exists()


def test_missing_dataset_fails_fast_naming_the_fix(tmp_path):
  empty = tmp_path / 'empty_data_dir'
  empty.mkdir()
  start = time.perf_counter()
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(tiny_config(str(empty), dataset='cifar10', **{
        'model.resolution': 32, 'input.channels': 3}), str(tmp_path / 'run'))
  assert time.perf_counter() - start < 20
  assert 'cifar10' in str(error.value) and str(empty) in str(error.value)
  assert not (tmp_path / 'run').exists()


def test_workdir_problems_leave_existing_runs_untouched(fashion_mnist_data_dir, tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('keep me')
  with pytest.raises(UserError, match='is a file'):
    train.train_and_evaluate(tiny_config(fashion_mnist_data_dir), str(a_file))
  with pytest.raises(UserError, match='not writable|is a file'):
    train.train_and_evaluate(tiny_config(fashion_mnist_data_dir), str(a_file / 'run'))
  assert a_file.read_text() == 'keep me'

  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(fashion_mnist_data_dir, num_train_steps=4), str(workdir))
  before = tree_snapshot(workdir)
  with pytest.raises(UserError, match='different config.model'):
    train.train_and_evaluate(
        tiny_config(fashion_mnist_data_dir, **{'model.width_multiplier': 0.5}), str(workdir))
  assert tree_snapshot(workdir) == before


def test_runs_recorded_before_a_field_existed_resume_and_evaluate(tmp_path):
  """A config.json from before model.name, model.ops or fused_inference blocks neither resume nor eval."""
  config = tiny_config(str(tmp_path / 'data'))
  recorded = config.to_dict()
  for field in ('fused_inference', 'name', 'ops'):  # MobileNetV1-only runs had none of these.
    del recorded['model'][field]
  recorded['model']['depthwise_implementation'] = 'shifted'
  (tmp_path / train.CONFIG_FILE).write_text(json.dumps(recorded))
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)  # A run to resume, not a crashed start.
  train.prepare_workdir(str(tmp_path), config)  # Same architecture: the resume goes ahead.
  loaded = evaluate.load_run_config(tmp_path)
  assert loaded.model.fused_inference is True and loaded.model.width_multiplier == 0.25
  assert loaded.model.name == 'mobilenet_v1' and loaded.model.ops == 'fast'
  config.model.ops = 'plain'  # How the same function is computed: accepted.
  train.prepare_workdir(str(tmp_path), config)
  for field, value in (('width_multiplier', 0.5), ('name', 'mobilenet_v2')):
    changed = tiny_config(str(tmp_path / 'data'), **{f'model.{field}': value})
    with pytest.raises(UserError, match='different config.model'):
      train.prepare_workdir(str(tmp_path), changed)
  run_folder.release_lock(tmp_path.absolute())


def run_cli(args, env=None, timeout=300):
  return subprocess.run([sys.executable, TRAIN_SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def test_cli_config_file_errors_are_one_line(tmp_path):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n  pass\n')
  for args, named in [
      (['--config', str(broken), '--workdir', str(tmp_path / 'a')], 'syntax error'),
      (['--config', 'configs/default.py', '--config.model.widht=0.5', '--workdir',
        str(tmp_path / 'b')], 'widht'),
      (['--config', 'configs/missing.py', '--workdir', str(tmp_path / 'c')], 'missing.py'),
  ]:
    result = run_cli(args)
    assert result.returncode == EXIT_CODE, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and named in lines[0], result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
  assert not any((tmp_path / name).exists() for name in 'abc')


def test_cli_batch_that_does_not_divide_over_devices(tmp_path):
  result = run_cli(['--config', 'configs/default.py', '--config.batch_size=12', '--workdir',
                    str(tmp_path / 'run')],
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert result.returncode == EXIT_CODE
  lines = error_lines(result.stderr)
  assert len(lines) == 1 and 'config.batch_size=12' in lines[0] and '8 devices' in lines[0]
  assert not (tmp_path / 'run').exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(fashion_mnist_data_dir, tmp_path):
  config = tiny_config(fashion_mnist_data_dir, **{
      'optimizer.learning_rate': 1e30, 'checkpoint_every_steps': 1, 'log_every_steps': 1,
      'num_train_steps': 20})
  with pytest.raises(UserError, match='NaN or infinite') as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  # Step 1's update is finite but blown up, and step 2 turns it into NaN: checkpoint 1 is the
  # state that diverged, so it is set aside, not named as good (it used to be; issue 15).
  assert saved_steps(tmp_path / 'run') == [] and 'step None' not in str(error.value)
  assert 'at step 2' in str(error.value) and 'a rerun starts from step 0' in str(error.value)
  assert (tmp_path / 'run' / 'checkpoints' / train.DIVERGED_FOLDER / '1').is_dir()


def wait_for(predicate, timeout: float, process: subprocess.Popen):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if process.poll() is not None:
      raise AssertionError(f'training exited early: {process.stderr.read()[-3000:]}')
    time.sleep(0.05)
  raise AssertionError('timed out')


def test_kill_9_and_resume_is_bitwise_identical(fashion_mnist_data_dir, tmp_path):
  """A run killed at a random moment after its first checkpoint, then resumed, equals one that never stopped."""
  # Long enough (a few seconds) that the kill lands mid-run on a fast machine too.
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=300, checkpoint_every_steps=10,
                       log_every_steps=10, **{'model.dropout_rate': 0.1})
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  workdir = tmp_path / 'killed'
  process = subprocess.Popen([sys.executable, TRAIN_SCRIPT, *cli_flags(config), '--workdir',
                              str(workdir)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    wait_for(lambda: saved_steps(workdir), 240, process)
    time.sleep(random.uniform(0, 2.0))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
  finally:
    process.kill()
  killed_at = saved_steps(workdir)
  assert killed_at and killed_at[-1] < 300, killed_at

  train.train_and_evaluate(config, str(workdir))
  resumed, straight = saved_state(workdir, 300), saved_state(tmp_path / 'straight', 300)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_then_the_same_command_resumes(fashion_mnist_data_dir, tmp_path):
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=400, checkpoint_every_steps=100,
                       log_every_steps=2)
  workdir = tmp_path / 'run'
  command = [sys.executable, TRAIN_SCRIPT, *cli_flags(config), '--workdir', str(workdir)]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  metrics_file = workdir / 'metrics.jsonl'
  try:
    wait_for(lambda: metrics_file.exists() and '"train"' in metrics_file.read_text(), 240, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 0, stderr[-3000:]
  assert 'SIGTERM' in stderr
  steps = saved_steps(workdir)
  assert len(steps) == 1 and 0 < steps[0] < 100  # Saved at preemption, not on schedule.

  resumed = run_cli([*cli_flags(config), '--workdir', str(workdir),
                     '--config.num_train_steps=' + str(steps[0] + 4)])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resuming at step {steps[0]}' in resumed.stderr
  assert saved_steps(workdir)[-1] == steps[0] + 4


ONE_VS_EIGHT = r'''
import functools, json, sys
import jax, numpy as np
from mobilenet.training import config_base, optim, parallel
from mobilenet.models.mobilenet import create_model
from mobilenet.training.train_step import create_train_state, train_step
config = config_base.base_config()
config.model.width_multiplier = 0.25
config.model.resolution = 16
config.batch_size = 16
model = create_model(config.model)
schedule = optim.learning_rate_schedule(config, 100, 1000)
tx = optim.create_optimizer(config, schedule)
rng = np.random.default_rng(0)
batch = {'image': rng.normal(size=(16, 16, 16, 1)).astype(np.float32),
         'label': rng.integers(0, 10, size=16).astype(np.int32)}
results = {}
for devices in (1, 8):
  mesh = parallel.create_mesh(jax.devices()[:devices])
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  state = jax.jit(functools.partial(create_train_state, model, tx, config, (16, 16, 1)),
                  out_shardings=replicated)()
  # As train.py jits it: the kernels run on each device's shard (ops/cpu/calls.py).
  step = jax.jit(parallel.on_mesh(mesh, functools.partial(train_step, model=model, tx=tx,
                                                          schedule=schedule, config=config)),
                 in_shardings=(replicated, sharded), out_shardings=(replicated, replicated))
  new_state, metrics = step(state, parallel.global_batch(batch, sharded))
  grads = jax.tree.map(lambda new, old: new - old, new_state.params, state.params)
  results[devices] = jax.device_get((metrics['loss'], grads, new_state.batch_stats))
  assert len(new_state.params['head']['kernel'].sharding.device_set) == devices
(loss1, grads1, stats1), (loss8, grads8, stats8) = results[1], results[8]
np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
  np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats8)):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
print('same on 1 and 8 devices', float(loss1))
'''


def test_one_and_eight_devices_compute_the_same_step():
  """Loss, updates (the gradients through SGD) and BatchNorm statistics over the global batch."""
  result = subprocess.run(
      [sys.executable, '-c', ONE_VS_EIGHT], capture_output=True, text=True, timeout=300, cwd=ROOT,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
           'PYTHONPATH': str(ROOT)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'same on 1 and 8 devices' in result.stdout


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def launch_two_processes(config, workdir) -> list[subprocess.Popen]:
  """scripts/train.py as processes 0 and 1 of a jax.distributed run on localhost."""
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, TRAIN_SCRIPT, *cli_flags(config), '--workdir', str(workdir),
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={index}'],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for index in (0, 1)]


def finish(processes, timeout=400) -> list[str]:
  """Waits for every process; asserts each exited 0; returns their stderr (also of a hung one).

  Each process's stderr is read as it comes (a full pipe would stall that process, and with
  it the collectives of the others).
  """
  with concurrent.futures.ThreadPoolExecutor(len(processes)) as pool:
    outputs = list(pool.map(lambda process: _stderr_within(process, timeout), processes))
  for process, stderr in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  return outputs


def _stderr_within(process, timeout) -> str:
  try:
    return process.communicate(timeout=timeout)[1]
  except subprocess.TimeoutExpired:
    process.kill()
    return 'timed out: ' + process.communicate()[1]


def test_two_processes_train_checkpoint_and_restore(fashion_mnist_data_dir, tmp_path):
  """jax.distributed on localhost: two CPU processes share one global batch and one workdir."""
  workdir = tmp_path / 'run'
  first = finish(launch_two_processes(tiny_config(fashion_mnist_data_dir, num_train_steps=8),
                                      workdir))
  assert 'process 1 of 2' in first[1] and '2 devices on 2 hosts' in first[0]
  assert saved_steps(workdir)[-1] == 8
  second = finish(launch_two_processes(tiny_config(fashion_mnist_data_dir, num_train_steps=12),
                                       workdir))
  assert 'resuming at step 8' in second[0]
  assert saved_steps(workdir)[-1] == 12
  evals = [json.loads(line) for line in (workdir / 'metrics.jsonl').open()
           if '"eval"' in line]
  assert [record['examples'] for record in evals] == [10_000, 10_000]


def test_sigterm_to_one_host_saves_the_same_step_on_both_and_they_resume(fashion_mnist_data_dir,
                                                                         tmp_path):
  """Preemption agreed across hosts: only process 1 gets SIGTERM; both save one step, exit 0."""
  config = tiny_config(fashion_mnist_data_dir, num_train_steps=400, checkpoint_every_steps=100,
                       log_every_steps=2)
  workdir = tmp_path / 'run'
  processes = launch_two_processes(config, workdir)
  metrics_file = workdir / 'metrics.jsonl'
  try:
    for process in processes:
      wait_for(lambda: metrics_file.exists() and '"train"' in metrics_file.read_text(), 300,
               process)
    processes[1].send_signal(signal.SIGTERM)
  except BaseException:
    for process in processes:
      process.kill()
    raise
  outputs = finish(processes, timeout=200)
  steps = saved_steps(workdir)
  assert len(steps) == 1 and 0 < steps[0] < 100, steps  # Saved at preemption, not on schedule.
  for stderr in outputs:  # The same step, decided together.
    assert f'SIGTERM (preemption) at step {steps[0]} on every host' in stderr, stderr[-3000:]

  # The agreed checkpoint is an ordinary one: both processes resume it and finish.
  resumed = finish(launch_two_processes(
      tiny_config(fashion_mnist_data_dir, num_train_steps=steps[0] + 4, checkpoint_every_steps=100,
                  log_every_steps=2), workdir))
  assert f'resuming at step {steps[0]}' in resumed[0]
  assert saved_steps(workdir)[-1] == steps[0] + 4
