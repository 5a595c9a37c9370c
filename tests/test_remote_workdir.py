"""Workdirs, sweep folders and a data dir on gs://, end to end, offline (tests/gcs_emulator.py).

The trainer, scripts/eval.py and scripts/sweep.py run as on a Cloud TPU VM, with
gs://bucket/... paths, against a local Cloud Storage emulator reached through
the real clients: TensorFlow's GCS file system (epath, TensorBoard, TFDS,
tf.data), TensorStore (Orbax's arrays) and google-cloud-storage (Orbax's bucket
check). The test reads the bucket back with its own google-cloud-storage client.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs

import gcs_emulator

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = 'bucket'
TINY = ['--config', str(ROOT / 'configs' / 'default.py'), '--config.model.width_multiplier=0.25',
        '--config.model.resolution=16', '--config.batch_size=32', '--config.eval_batch_size=1000',
        '--config.log_every_steps=4', '--config.checkpoint_every_steps=4',
        '--config.eval_every_steps=1000', '--config.schedule.warmup_epochs=0.0']


@pytest.fixture(scope='module')
def emulator():
  with gcs_emulator.running(BUCKET) as env:
    yield env


@pytest.fixture(scope='module')
def bucket(emulator):
  client = gcs.Client(project='test', credentials=AnonymousCredentials(),
                      client_options={'api_endpoint': emulator['STORAGE_EMULATOR_HOST']})
  return client.bucket(BUCKET)


def objects(bucket, prefix: str) -> list[str]:
  """Object names under gs://bucket/<prefix>, relative to it (folder markers left out)."""
  return sorted(blob.name[len(prefix):] for blob in bucket.list_blobs(prefix=prefix)
                if not blob.name.endswith('/'))


def text(bucket, name: str) -> str:
  return bucket.blob(name).download_as_text()


def run(script: str, args: list[str], env: dict, timeout: float = 400):
  return subprocess.run([sys.executable, str(ROOT / 'scripts' / script), *args], cwd=ROOT,
                        env={**os.environ, **env}, capture_output=True, text=True,
                        timeout=timeout)


def metric_keys(bucket, prefix: str) -> list[tuple[str, int]]:
  return [(row['split'], row['step']) for row in map(json.loads, text(
      bucket, prefix + 'metrics.jsonl').splitlines())]


@pytest.mark.slow
def test_train_refuse_fall_back_resume_and_evaluate_on_gcs(emulator, bucket, fashion_mnist_data_dir):
  run_dir = f'gs://{BUCKET}/runs/a'
  prefix = 'runs/a/'
  data = [f'--config.data_dir={fashion_mnist_data_dir}']

  first = run('train.py', [*TINY, *data, '--config.num_train_steps=8', '--workdir', run_dir],
              emulator)
  assert first.returncode == 0, first.stderr[-3000:]
  files = objects(bucket, prefix)
  assert {'config.json', 'metrics.jsonl', 'checkpoints/4/checksums.sha256',
          'checkpoints/8/checksums.sha256', 'checkpoints/8/commit_success.txt'} <= set(files)
  assert any(name.startswith('tensorboard/events.out.tfevents') for name in files)
  assert 'train.lock' not in files  # Deleted when the run ended.
  assert json.loads(text(bucket, prefix + 'config.json'))['num_train_steps'] == 8
  assert f'checkpoints  {run_dir}/checkpoints' in first.stderr  # The summary keeps gs://.

  # A lock left by a trainer that is gone (or still running elsewhere): refused, named.
  bucket.blob(prefix + 'train.lock').upload_from_string('pid 4242 on other-host, since then\n')
  refused = run('train.py', [*TINY, *data, '--config.num_train_steps=12', '--workdir', run_dir],
                emulator)
  assert refused.returncode == 2
  errors = [line for line in refused.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'pid 4242 on other-host' in errors[0], refused.stderr[-2000:]
  assert f'gcloud storage rm {run_dir}/train.lock' in errors[0]
  assert objects(bucket, prefix) == sorted(files + ['train.lock'])  # Nothing else was touched.
  bucket.blob(prefix + 'train.lock').delete()

  # The newest checkpoint damaged, and a longer run asked for: checkpoint 8 is moved aside on
  # the bucket (copy and delete), the run resumes from 4, and config.json is replaced (the old
  # one kept in the history).
  bucket.blob(prefix + 'checkpoints/8/_CHECKPOINT_METADATA').upload_from_string('{"garbled": ')
  resumed = run('train.py', [*TINY, *data, '--config.num_train_steps=12', '--workdir', run_dir],
                emulator)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'checkpoint 8' in resumed.stderr and 'resuming at step 4' in resumed.stderr
  files = objects(bucket, prefix)
  assert 'checkpoints/damaged/8/_CHECKPOINT_METADATA' in files
  assert {'checkpoints/8/checksums.sha256', 'checkpoints/12/checksums.sha256'} <= set(files)
  history = text(bucket, prefix + 'config_history.jsonl').splitlines()
  assert len(history) == 1 and '"num_train_steps": 8' in json.loads(history[0])['config_json']
  keys = metric_keys(bucket, prefix)
  assert len(keys) == len(set(keys)) and ('eval', 12) in keys and ('train', 12) in keys

  # scripts/eval.py on a gs:// glob, reading the test split from a data dir on gs:// too (TFDS
  # and tf.data through TensorFlow's GCS file system); the outputs go to the runs' common folder.
  local = pathlib.Path(fashion_mnist_data_dir)
  for path in local.rglob('*'):
    if path.is_file() and '-train.' not in path.name:  # Eval reads the test split only.
      bucket.blob(f'tfds/{path.relative_to(local)}').upload_from_filename(path)
  evaluated = run('eval.py', ['--workdir', f'gs://{BUCKET}/runs/*', '--data_dir',
                              f'gs://{BUCKET}/tfds'], emulator)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert '| a | mobilenet_v1 |' in evaluated.stdout and '| ok |' in evaluated.stdout
  outputs = objects(bucket, 'runs/')
  assert {'results.csv', 'results.jsonl', 'accuracy_vs_params.png',
          'accuracy_vs_mult_adds.png'} <= set(outputs)
  row = json.loads(text(bucket, 'runs/results.jsonl').splitlines()[0])
  final = [json.loads(line) for line in text(bucket, prefix + 'metrics.jsonl').splitlines()
           if json.loads(line)['split'] == 'eval'][-1]
  assert row['workdir'] == run_dir and row['step'] == 12 and row['examples'] == 10000
  assert row['top1'] == pytest.approx(final['top1'], abs=1e-6)  # The trainer's own final eval.
  assert bucket.blob('runs/accuracy_vs_params.png').download_as_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_sweep_on_gcs(emulator, bucket, fashion_mnist_data_dir):
  sweep_dir = f'gs://{BUCKET}/sweep'
  result = run('sweep.py', [*TINY, f'--config.data_dir={fashion_mnist_data_dir}',
                            '--config.num_train_steps=4', '--workdir', sweep_dir,
                            '--sweep', 'model.width_multiplier=0.25'], emulator)
  assert result.returncode == 0, result.stderr[-3000:]
  files = objects(bucket, 'sweep/')
  assert 'width_multiplier=0.25/checkpoints/4/checksums.sha256' in files
  assert {'results.csv', 'results.jsonl', 'accuracy_vs_params.png'} <= set(files)
  row = json.loads(text(bucket, 'sweep/results.jsonl').splitlines()[0])
  assert row['workdir'] == f'{sweep_dir}/width_multiplier=0.25' and row['step'] == 4


def test_gcs_paths_keep_their_scheme_in_sweeps_and_eval_outputs():
  from mobilenet.experiments import evaluate, sweep  # pylint: disable=import-outside-toplevel
  assert evaluate.default_output_dir(['gs://b/runs/a', 'gs://b/runs/b/']) == 'gs://b/runs'
  assert evaluate.default_output_dir(['gs://b/x/a', 'gs://b/y/a']) == 'gs://b'
  grid = sweep.variants(sweep.parse_axes(['model.width_multiplier=0.25,0.5']), 'gs://b/sweep')
  assert [str(v.workdir) for v in grid] == ['gs://b/sweep/width_multiplier=0.25',
                                            'gs://b/sweep/width_multiplier=0.5']
  assert f'--workdir={grid[0].workdir}' in sweep.train_command('c.py', {}, grid[0])
