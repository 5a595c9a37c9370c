"""Runs started at once on a fresh machine share one data dir: one prepares, the others wait."""
import os
import pathlib
import subprocess
import sys

import pytest

from mobilenet.data import fashion_mnist_offline

pytestmark = pytest.mark.slow  # The whole module is the full tier (see pyproject.toml).

ROOT = pathlib.Path(__file__).resolve().parents[1]

ENSURE = r'''
import sys
from absl import logging
logging.set_verbosity(logging.INFO)
logging.use_absl_handler()
from mobilenet.training import config_base
from mobilenet.data import input_pipeline
config = config_base.base_config()
config.data_dir = sys.argv[1]
input_pipeline.ensure_available(config)
print('available')
'''


@pytest.mark.skipif(not fashion_mnist_offline.debian_files_available(),
                    reason='needs the Debian package dataset-fashion-mnist')
def test_three_processes_prepare_fashion_mnist_into_one_fresh_dir(tmp_path):
  """Without the lock all but one fail with FileExistsError on TFDS's final rename."""
  data_dir = tmp_path / 'tfds'  # Missing: the first to lock creates it.
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'CUDA_VISIBLE_DEVICES': ''}
  processes = [subprocess.Popen([sys.executable, '-c', ENSURE, str(data_dir)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
  outputs = [process.communicate(timeout=600) for process in processes]
  for process, (stdout, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
    assert 'available' in stdout
  logs = [stderr for _, stderr in outputs]
  # Exactly one built it; the others either waited for it or found it done.
  assert sum('Preparing fashion_mnist' in log for log in logs) == 1, logs
  # Started together, the others wait for the lock (saying so), then re-check.
  assert any('Another process is preparing fashion_mnist' in log for log in logs), logs
  assert any('by another process' in log for log in logs), logs
  import tensorflow_datasets as tfds
  builder = tfds.builder('fashion_mnist', data_dir=str(data_dir))
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 60_000
  test = builder.as_dataset(split='test', batch_size=-1)
  assert test['label'].shape == (10_000,)
  assert not list(data_dir.glob('fashion_mnist/incomplete*'))
