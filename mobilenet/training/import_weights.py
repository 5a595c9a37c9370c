"""keras.applications weights -> a run folder at step 0 (scripts/import_weights.py).

    python3 scripts/import_weights.py --config configs/imagenet.py \
        --keras_weights imagenet --workdir runs/keras_mobilenet_v1

The run folder is the trainer's own: config.json (through run_folder) and
checkpoint 0, a TrainState whose params and batch_stats are the Keras
model's and whose optimizer state is fresh. So `scripts/eval.py` evaluates it
and `scripts/train.py` with the same config continues training it from step
0, or another config starts from it with `config.init_from` (init_from.py).

Keras fixes some of what the config may choose; the importer sets those
fields and logs each change: the 'imagenet' form, separable convolutions,
ReLU6 for V1, BatchNorm epsilon 1e-3, three input channels, and inputs scaled
to [-1, 1] (config.input.normalization='minus_one_to_one', which Keras'
MobileNets and the released checkpoints were trained on; the project's
default scales by the dataset's mean and std).

`--keras_weights` is a file Keras saved (`.h5`: the official downloads and
`model.save('x.h5')`; `.weights.h5`: `model.save_weights`) or 'imagenet': the
official file from Keras' cache (~/.keras/models, or $KERAS_HOME/models),
downloaded there first when its host answers within a few seconds.
"""
import functools
import hashlib
import json
import os
import pathlib
import socket
import threading
import time
import urllib.parse
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mobilenet.errors import UserError
from mobilenet.models import keras_weights
from mobilenet.models.mobilenet import MobileNet, create_model, model_plan
from mobilenet.training import checkpointing, config_base, optim, run_folder, storage, train
from mobilenet.training.train_step import create_train_state

# What the importer leaves in the run folder besides the trainer's files: where the weights came from.
IMPORTED_FROM_FILE = 'imported_from.json'
# How long to wait for the weights' download host before declaring it offline.
NETWORK_PROBE_TIMEOUT_S = 3.0
# Converted logits must equal Keras' to this relative error (float32 summation order).
MAX_RELATIVE_ERROR = 1e-4


def keras_settings(config: ml_collections.ConfigDict) -> dict[str, object]:
  """{field: value} that Keras' models fix, for the architecture `config.model.name`."""
  settings = {'model.form': 'imagenet', 'model.conv_type': 'separable',
              'model.batch_norm_epsilon': 1e-3, 'input.channels': 3,
              'input.normalization': 'minus_one_to_one'}
  if config.model.name == 'mobilenet_v1':
    settings['model.activation'] = 'relu6'  # V2 and V3 have their activations in their tables.
  return settings


def apply_keras_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with `keras_settings`, each change logged."""
  config = config.copy_and_resolve_references()
  for field, value in keras_settings(config).items():
    section, name = field.split('.')
    if config[section][name] != value:
      logging.info('config.%s=%s (was %s): as Keras builds %s', field, value,
                   config[section][name], config.model.name)
      config[section][name] = value
  return config


def _keras_cache_dir() -> pathlib.Path:
  """Where keras.utils.get_file keeps downloaded weights (its cache_subdir 'models')."""
  home = os.environ.get('KERAS_HOME') or os.path.join(os.path.expanduser('~'), '.keras')
  return pathlib.Path(home) / 'models'


def _host_reachable(url: str, timeout_s: float = NETWORK_PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to the URL's host opens within `timeout_s`.

  In a daemon thread: the connect timeout does not bound the DNS lookup,
  which can hang for tens of seconds on a machine without network.
  """
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  connected = threading.Event()

  def connect():
    try:
      with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
        connected.set()
    except OSError:
      pass

  threading.Thread(target=connect, daemon=True).start()
  return connected.wait(timeout_s)


def official_weights_path(model_config: ml_collections.ConfigDict) -> pathlib.Path:
  """The official ImageNet weights file in Keras' cache, downloaded there if need be."""
  try:
    file_name, url = keras_weights.official_weights(model_config)
  except keras_weights.WeightsMismatch as error:
    raise UserError(f'{error}; pass one of those as --config.model.width_multiplier, or '
                    '--keras_weights=<a weights file>') from None
  if model_config.num_classes != 1000:
    raise UserError(f'the ImageNet weights have 1000 classes, config.model.num_classes is '
                    f'{model_config.num_classes}; pass --config.model.num_classes=1000 (and start '
                    'another run from this one with config.init_from to change the classes)')
  cache = _keras_cache_dir()
  cached = cache / file_name
  if cached.is_file():
    logging.info('using %s from the Keras cache', cached)
    return cached
  if not _host_reachable(url):
    raise UserError(
        f'cannot download the ImageNet weights {file_name} (no connection to '
        f'{urllib.parse.urlparse(url).hostname} within {NETWORK_PROBE_TIMEOUT_S:g} s): download '
        f'{url} on a machine with network access and put it in {cache}/ (then rerun with '
        f'--keras_weights imagenet) or pass --keras_weights=<path to {file_name}>')
  import keras  # pylint: disable=g-import-not-at-top  # Imports TensorFlow: only when asked.
  logging.info('downloading %s into %s', url, cache)
  try:
    return pathlib.Path(keras.utils.get_file(file_name, url, cache_subdir='models'))
  except Exception as error:  # urllib and Keras raise many types for a failed download.
    raise UserError(f'downloading {url} failed ({type(error).__name__}: '
                    f'{" ".join(str(error).split())[:200]}); download it by hand into {cache}/ '
                    f'or pass --keras_weights=<path to {file_name}>') from None


def _keras_message(error: Exception) -> str:
  """Keras' reason in one line: its first sentence and the first layer it names, no tensors."""
  text = ' '.join(str(error).split())
  for cut in (' Target variable:', ' List of objects'):
    text = text.split(cut)[0]
  return text[:400].rstrip('. ')


def load_keras_model(config: ml_collections.ConfigDict, weights_file: pathlib.Path):
  """The Keras model `config.model` describes, with the weights of `weights_file`."""
  if not weights_file.is_file():
    raise UserError(f'--keras_weights {weights_file} is not a file; pass a Keras weights file '
                    "(.h5 or .weights.h5) or 'imagenet'")
  if not weights_file.name.endswith('.h5'):
    raise UserError(f'--keras_weights {weights_file} is not a Keras weights file (.h5 or '
                    '.weights.h5, as model.save_weights and keras.applications write them)')
  model = config.model
  described = (f'{model.name} alpha {model.width_multiplier:g} with {model.num_classes} classes')
  try:
    keras_model = keras_weights.keras_application(model)
  except ValueError as error:
    raise UserError(f'Keras cannot build {described} at {model.resolution}x{model.resolution} '
                    f'({_keras_message(error)}); change the config') from None
  try:
    with warnings.catch_warnings():  # Keras warns once per layer container it finds no group for.
      warnings.simplefilter('ignore')
      keras_model.load_weights(str(weights_file))
  except (ValueError, KeyError, OSError) as error:
    raise UserError(
        f'--keras_weights {weights_file} does not fit {described} (Keras: '
        f'{_keras_message(error)}); pass the --config.model.name, --config.model.width_multiplier '
        'and --config.model.num_classes the file was saved with') from None
  return keras_model


def _relative_error(have, want) -> float:
  return float(np.max(np.abs(np.asarray(have) - want)) / max(np.max(np.abs(want)), 1e-30))


def convert_checked(config: ml_collections.ConfigDict, keras_model) -> dict:
  """Flax variables of the Keras model, checked to compute Keras' logits on random images."""
  try:
    variables = keras_weights.convert(keras_model, model_plan(config.model))
  except keras_weights.WeightsMismatch as error:
    raise UserError(f'{error}; pass the --config.model.name and --config.model.width_multiplier '
                    'the weights were saved with') from None
  side = config.model.resolution
  images = np.random.default_rng(0).uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
  want = np.asarray(keras_model(images, training=False))
  reference = MobileNet(plan=model_plan(config.model), num_classes=config.model.num_classes,
                        batch_norm_epsilon=config.model.batch_norm_epsilon, ops='plain')
  error = _relative_error(jax.jit(reference.apply)(variables, images), want)
  logging.info("converted logits vs Keras': relative error %.2g", error)
  if not error <= MAX_RELATIVE_ERROR:
    raise UserError(f'the converted weights compute other logits than Keras (relative error '
                    f'{error:.2g}); the config does not describe the Keras model, check '
                    '--config.model.* against it')
  return variables


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def initial_state(config: ml_collections.ConfigDict, variables: dict):
  """The TrainState train.py would create at step 0, holding `variables`."""
  model = create_model(config.model)
  # The schedule's length shapes no state: one step per epoch is as good as the real count.
  tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 1, 1))
  image_shape = (config.model.resolution, config.model.resolution, config.input.channels)
  fresh = jax.eval_shape(functools.partial(create_train_state, model, tx, config, image_shape))
  params = jax.tree.map(jnp.asarray, variables['params'])
  batch_stats = jax.tree.map(jnp.asarray, variables['batch_stats'])
  state = fresh.replace(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema_params=({'params': params, 'batch_stats': batch_stats}
                  if config.ema_decay > 0 else None))
  have, want = jax.tree.structure(state), jax.tree.structure(fresh)
  if have != want or any(a.shape != b.shape for a, b in zip(jax.tree.leaves(state),
                                                              jax.tree.leaves(fresh))):
    raise UserError('the converted weights do not form the training state of this config; '
                    'check --config.model.* against the Keras model')
  return state


def import_keras_weights(config: ml_collections.ConfigDict, keras_weights_arg: str,
                         workdir: str) -> epath.Path:
  """Writes a run folder (config.json, checkpoint 0) holding Keras' weights; returns its path."""
  started = time.perf_counter()
  config = apply_keras_settings(config)
  config_base.validate(config)
  path = storage.path(workdir)
  if run_folder.has_checkpoint(path):
    raise UserError(f'--workdir {path} already holds a run with checkpoints; pass a new --workdir '
                    '(importing never overwrites a run)')
  if keras_weights_arg == 'imagenet':
    weights_file = official_weights_path(config.model)
  else:
    weights_file = pathlib.Path(keras_weights_arg).expanduser().absolute()
  keras_model = load_keras_model(config, weights_file)
  variables = convert_checked(config, keras_model)
  state = initial_state(config, variables)
  path = train.prepare_workdir(str(path), config)  # Checks, creates, locks, writes config.json.
  try:
    if run_folder.has_checkpoint(path):  # Under the lock: a trainer may have just saved one.
      raise UserError(f'--workdir {path} already holds a run with checkpoints; pass a new '
                      '--workdir (importing never overwrites a run)')
    checkpoints = checkpointing.Checkpoints(path / 'checkpoints', config.keep_checkpoints)
    try:
      checkpoints.save(0, state)
    finally:
      checkpoints.close()
    record = {'keras_weights': str(weights_file), 'sha256': _sha256(weights_file),
              'keras_model': keras_model.name, 'step': 0, 'imported_at': time.time()}
    storage.write_atomically(path / IMPORTED_FROM_FILE, json.dumps(record, indent=2) + '\n')
  finally:
    if jax.process_index() == 0:
      run_folder.release_lock(path)
  logging.info('imported %s (%s) into %s as checkpoint 0 in %.1f s; evaluate with: python3 '
               'scripts/eval.py --workdir %s', weights_file.name, keras_model.name, path,
               time.perf_counter() - started, path)
  return path
