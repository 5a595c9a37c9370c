"""scripts/import_weights.py: Keras weights files -> run folders that compute Keras' logits."""
import json
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mobilenet.errors import EXIT_CODE, UserError
from mobilenet.models import keras_weights
from mobilenet.models.mobilenet import create_model
from mobilenet.training import config_base, import_weights, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESOLUTION = 32  # Keras' smallest; even at every stride-2 layer, as 224 is.


@pytest.fixture(scope='module')
def keras():
  import keras as keras_module  # Imports TensorFlow: only for the tests that build Keras models.
  return keras_module


def import_config(name: str, alpha: float, num_classes: int = 10, resolution: int = RESOLUTION,
                  **overrides):
  """configs/imagenet.py's fields at a small size (what --config.model.* overrides would give)."""
  spec_config = config_base.sibling_config(str(ROOT / 'configs' / 'imagenet.py'), 'imagenet')
  config = spec_config.get_config()
  config.model.name = name
  config.model.width_multiplier = alpha
  config.model.resolution = resolution
  config.model.num_classes = num_classes
  for dotted, value in overrides.items():
    section, field = dotted.split('.') if '.' in dotted else (None, dotted)
    (config[section] if section else config)[field] = value
  return config


def random_keras_model(config):
  """The Keras model of `config.model` with random weights and BatchNorms moved off 1, 0, 0, 1."""
  model = keras_weights.keras_application(config.model)
  rng = np.random.default_rng(0)
  for layer in model.layers:
    if type(layer).__name__ == 'BatchNormalization':
      shape = layer.get_weights()[0].shape
      layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.2, shape),
                         rng.normal(0, 0.2, shape), rng.uniform(0.5, 1.5, shape)])
  return model


def save(model, folder: pathlib.Path, suffix: str) -> pathlib.Path:
  """The weights as Keras writes them: .weights.h5 (save_weights) or legacy .h5 (model.save)."""
  path = folder / f'{model.name}{suffix}'
  if suffix == '.weights.h5':
    model.save_weights(path)
  else:
    model.save(path)
  return path


def restored_variables(workdir: pathlib.Path) -> dict:
  state = ocp.PyTreeCheckpointer().restore(workdir / 'checkpoints' / '0' / 'default')
  return state


def relative_error(have, want) -> float:
  return float(np.max(np.abs(np.asarray(have) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize('name, alpha, suffix', [
    ('mobilenet_v1', 0.25, '.h5'), ('mobilenet_v3_small_minimalistic', 1.0, '.weights.h5'),
    # 25-60 s each on 2 busy cores (Keras' graphs and two compiled Flax models per variant):
    pytest.param('mobilenet_v2', 0.35, '.weights.h5', marks=pytest.mark.slow),
    pytest.param('mobilenet_v3_large', 0.75, '.h5', marks=pytest.mark.slow),
    pytest.param('mobilenet_v3_small', 0.75, '.weights.h5', marks=pytest.mark.slow),
    pytest.param('mobilenet_v3_large_minimalistic', 0.5, '.h5', marks=pytest.mark.slow)])
def test_imported_run_computes_keras_logits(keras, name, alpha, suffix, tmp_path):
  config = import_config(name, alpha)
  model = random_keras_model(config)
  weights_file = save(model, tmp_path, suffix)
  workdir = import_weights.import_keras_weights(config, str(weights_file), str(tmp_path / 'run'))

  recorded = json.loads((workdir / 'config.json').read_text())
  assert recorded['model']['form'] == 'imagenet'
  assert recorded['input']['normalization'] == 'minus_one_to_one'
  assert recorded['input']['channels'] == 3
  if name == 'mobilenet_v1':
    assert recorded['model']['activation'] == 'relu6'
  state = restored_variables(workdir)
  assert int(state['step']) == 0
  images = np.random.default_rng(1).uniform(-1, 1, (3, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
  want = np.asarray(model(images, training=False))
  run_config = import_weights.apply_keras_settings(config)
  for op_set in ('plain', 'fast'):
    run_config.model.ops = op_set
    have = jax.jit(create_model(run_config.model).apply)(
        {'params': state['params'], 'batch_stats': state['batch_stats']}, images)
    assert relative_error(have, want) <= 1e-5, (name, op_set)
  provenance = json.loads((workdir / import_weights.IMPORTED_FROM_FILE).read_text())
  assert provenance['keras_weights'] == str(weights_file) and len(provenance['sha256']) == 64


def test_a_file_of_another_width_or_architecture_is_one_line_and_creates_nothing(keras, tmp_path):
  weights_file = save(random_keras_model(import_config('mobilenet_v2', 0.35)), tmp_path,
                      '.weights.h5')
  legacy_file = save(random_keras_model(import_config('mobilenet_v1', 0.25)), tmp_path, '.h5')
  cases = [(import_config('mobilenet_v2', 0.5), weights_file, 'mobilenet_v2 alpha 0.5'),
           (import_config('mobilenet_v3_small', 1.0), weights_file, 'mobilenet_v3_small'),
           (import_config('mobilenet_v2', 0.35, num_classes=12), weights_file, '12 classes'),
           (import_config('mobilenet_v1', 0.5), legacy_file, 'Shape mismatch'),
           (import_config('mobilenet_v1', 0.25), tmp_path / 'missing.h5', 'is not a file')]
  for config, path, named in cases:
    with pytest.raises(UserError, match=named) as raised:
      import_weights.import_keras_weights(config, str(path), str(tmp_path / 'run'))
    assert '\n' not in str(raised.value) and len(str(raised.value)) < 700, str(raised.value)
    assert not (tmp_path / 'run').exists()


def test_imagenet_offline_fails_within_seconds_naming_the_file(monkeypatch, tmp_path):
  """No connection to the download host: one line with the file, its URL and where it goes."""
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras_home'))
  # An address that never answers, so the test is offline on any machine.
  monkeypatch.setattr(keras_weights, 'OFFICIAL_WEIGHTS_URL', 'https://10.255.255.1/keras/')
  config = import_config('mobilenet_v1', 0.25, num_classes=1000, resolution=128)
  started = time.perf_counter()
  with pytest.raises(UserError) as raised:
    import_weights.import_keras_weights(config, 'imagenet', str(tmp_path / 'run'))
  assert time.perf_counter() - started < 10
  message = str(raised.value)
  assert 'mobilenet_2_5_128_tf.h5' in message and str(tmp_path / 'keras_home' / 'models') in message
  assert '--keras_weights' in message and '\n' not in message
  assert not (tmp_path / 'run').exists()


def test_imagenet_cli_without_network_is_one_line_within_seconds(tmp_path):
  """The real URL through the CLI: offline (this machine) one line within seconds; online, a run."""
  env = {'KERAS_HOME': str(tmp_path / 'keras_home'), 'PATH': '/usr/bin:/bin',
         'PYTHONPATH': str(ROOT), 'HOME': str(tmp_path)}
  started = time.perf_counter()
  result = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'import_weights.py'), '--config',
       str(ROOT / 'configs' / 'imagenet.py:0.25,128'), '--keras_weights', 'imagenet',
       '--workdir', str(tmp_path / 'run')],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  if result.returncode == 0:  # A machine with network access: Keras downloaded the file.
    assert (tmp_path / 'keras_home' / 'models' / 'mobilenet_2_5_128_tf.h5').is_file()
    assert (tmp_path / 'run' / 'checkpoints' / '0').is_dir()
    return
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert result.returncode == EXIT_CODE and len(errors) == 1, result.stderr[-2000:]
  assert 'cannot download the ImageNet weights mobilenet_2_5_128_tf.h5' in errors[0]
  assert str(tmp_path / 'keras_home' / 'models') in errors[0]
  # Python, JAX and TensorFlow start in seconds; the probe waits 3 s more.
  assert time.perf_counter() - started < 60 and not (tmp_path / 'run').exists()


def test_a_cached_official_file_is_used(keras, monkeypatch, tmp_path):
  """--keras_weights imagenet reads Keras' cache without the network (the file named as Keras does)."""
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras_home'))
  monkeypatch.setattr(keras_weights, 'OFFICIAL_WEIGHTS_URL', 'https://10.255.255.1/keras/')
  config = import_config('mobilenet_v1', 0.25, num_classes=1000, resolution=128)
  model = random_keras_model(import_weights.apply_keras_settings(config))
  cache = tmp_path / 'keras_home' / 'models'
  cache.mkdir(parents=True)
  model.save(cache / 'mobilenet_2_5_128_tf.h5')
  started = time.perf_counter()
  workdir = import_weights.import_keras_weights(config, 'imagenet', str(tmp_path / 'run'))
  assert (workdir / 'checkpoints' / '0').is_dir()
  provenance = json.loads((workdir / import_weights.IMPORTED_FROM_FILE).read_text())
  assert provenance['keras_weights'] == str(cache / 'mobilenet_2_5_128_tf.h5')
  assert time.perf_counter() - started < 60


def test_an_existing_run_is_never_overwritten(keras, tmp_path):
  config = import_config('mobilenet_v1', 0.25)
  weights_file = save(random_keras_model(config), tmp_path, '.weights.h5')
  workdir = import_weights.import_keras_weights(config, str(weights_file), str(tmp_path / 'run'))
  before = (workdir / 'config.json').read_text()
  with pytest.raises(UserError, match='already holds a run'):
    import_weights.import_keras_weights(import_config('mobilenet_v1', 0.25, seed=3),
                                        str(weights_file), str(workdir))
  assert (workdir / 'config.json').read_text() == before


@pytest.mark.slow
def test_eval_and_train_accept_the_imported_run(keras, fashion_mnist_data_dir, tmp_path):
  """eval.py's evaluation reads the imported run; train.py continues it from step 0."""
  from mobilenet.experiments import evaluate
  from mobilenet.training import parallel
  config = import_config('mobilenet_v1', 0.25, dataset='fashion_mnist',
                         data_dir=fashion_mnist_data_dir, batch_size=32, eval_batch_size=1000,
                         num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=1000,
                         log_every_steps=1)
  config.input.cache = True
  config.schedule.warmup_epochs = 0.0
  weights_file = save(random_keras_model(config), tmp_path, '.weights.h5')
  workdir = import_weights.import_keras_weights(config, str(weights_file), str(tmp_path / 'run'))

  result = evaluate.evaluate_run(str(workdir), parallel.create_mesh())
  assert result.step == 0 and result.examples == 10_000 and 0 <= result.top1 <= 1, result

  run_config = evaluate.load_run_config(workdir)
  scores = train.train_and_evaluate(run_config, str(workdir))
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 2 and scores['examples'] == 10_000


@pytest.mark.parametrize('dataset, channels', [('cifar10', 3), ('fashion_mnist', 3),
                                               ('fashion_mnist', 1)])
def test_minus_one_to_one_scales_pixels_as_keras_expects(dataset, channels):
  """config.input.normalization='minus_one_to_one': x / 127.5 - 1 whatever the dataset's statistics."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from mobilenet.data import input_pipeline  # pylint: disable=import-outside-toplevel
  config = config_base.base_config()
  config.dataset = dataset
  config.model.resolution = 4
  config.input.channels = channels
  config.input.normalization = 'minus_one_to_one'
  native = 3 if dataset == 'cifar10' else 1
  pixels = np.arange(4 * 4 * native).reshape(1, 4, 4, native) * 255 // (4 * 4 * native - 1)
  out = input_pipeline._normalize(tf.constant(pixels, tf.uint8), config,  # pylint: disable=protected-access
                                  input_pipeline._spec(config))  # pylint: disable=protected-access
  want = pixels / 127.5 - 1
  if channels > native:
    want = np.repeat(want, channels, axis=-1)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)
  assert np.isclose(np.asarray(out).min(), -1) and np.isclose(np.asarray(out).max(), 1)
