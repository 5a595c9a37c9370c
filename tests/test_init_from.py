"""config.init_from: a run starts from another run's weights, adapted to its classes and channels."""
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.errors import UserError
from mobilenet.models.mobilenet import create_model
from mobilenet.training import (checkpointing, config_base, init_from, optim, parallel,
                                run_folder, train)
from mobilenet.training.train_step import create_train_state


def model_config(num_classes: int, channels: int, resolution: int, ema_decay: float = 0.0,
                 **overrides):
  config = config_base.base_config()
  config.model.form = 'imagenet'
  config.model.width_multiplier = 0.25
  config.model.resolution = resolution
  config.model.num_classes = num_classes
  config.input.channels = channels
  config.ema_decay = ema_decay
  config.model.ops = 'plain'  # Compiles in a fraction of the fast ops' time; same parameters.
  for dotted, value in overrides.items():
    section, field = dotted.split('.') if '.' in dotted else (None, dotted)
    (config[section] if section else config)[field] = value
  return config


def build_state(config):
  model = create_model(config.model)
  tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 1, 1))
  side = config.model.resolution
  state = jax.jit(functools.partial(create_train_state, model, tx, config,
                                    (side, side, config.input.channels)))()
  return model, tx, state


def write_source_run(folder: pathlib.Path, config) -> dict:
  """A run folder (config.json, checkpoint 7) whose weights and statistics are unlike a fresh
  init's; returns the EMA weights and statistics, the ones a run that kept an average evaluates."""
  _, _, state = build_state(config)
  rng = np.random.default_rng(0)
  noisy = lambda leaf: leaf + rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype)
  state = state.replace(step=jnp.int32(7), params=jax.tree.map(noisy, state.params),
                        batch_stats=jax.tree.map(lambda v: jnp.abs(noisy(v)), state.batch_stats))
  ema = {'params': jax.tree.map(noisy, state.params),
         'batch_stats': jax.tree.map(lambda v: jnp.abs(noisy(v)), state.batch_stats)}
  state = state.replace(ema_params=ema)
  folder.mkdir(parents=True)
  run_folder.record_config(folder, config)
  checkpoints = checkpointing.Checkpoints(folder / 'checkpoints')
  checkpoints.save(7, state)
  checkpoints.close()
  return ema


SOURCE = dict(num_classes=12, channels=3, resolution=32, ema_decay=0.99)


@pytest.fixture(scope='module')
def source_run(tmp_path_factory) -> tuple[pathlib.Path, dict]:
  """One RGB run with 12 classes that kept an EMA, shared by the tests (saving it takes seconds)."""
  folder = tmp_path_factory.mktemp('init_from') / 'source'
  return folder, write_source_run(folder, model_config(**SOURCE))


def start_from(source: pathlib.Path, config):
  config.init_from = str(source)
  model, tx, state = build_state(config)
  sharding = parallel.replicated(parallel.create_mesh())
  return model, tx, state, init_from.initialize(state, config, tx, sharding)


def test_same_classes_and_grayscale_input_compute_what_the_source_computed_on_rgb(source_run):
  """Stem summed over RGB: a gray image g gives the source's logits for (g, g, g)."""
  folder, source = source_run
  config = model_config(12, 1, 24)  # Grayscale, and another input size.
  model, tx, fresh, state = start_from(folder, config)
  assert int(state.step) == 0 and state.ema_params is None  # This run keeps no average.
  gray = np.random.default_rng(1).normal(size=(2, 24, 24, 1)).astype(np.float32)
  have = jax.jit(model.apply)({'params': state.params, 'batch_stats': state.batch_stats}, gray)
  source_model = create_model(model_config(**SOURCE).model)
  want = jax.jit(source_model.apply)(source, np.repeat(gray, 3, axis=-1))  # Its EMA weights.
  np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
  # Fresh optimizer state for the loaded weights, not the source's or the random init's.
  for have_leaf, want_leaf in zip(jax.tree.leaves(state.opt_state),
                                  jax.tree.leaves(tx.init(state.params))):
    np.testing.assert_array_equal(have_leaf, want_leaf)
  assert not np.array_equal(state.params['head']['kernel'], fresh.params['head']['kernel'])


def test_another_class_count_gets_a_fresh_classifier_and_the_source_backbone(source_run):
  folder, source = source_run
  _, _, fresh, state = start_from(folder, model_config(10, 3, 16, ema_decay=0.9))
  np.testing.assert_array_equal(state.params['head']['kernel'], fresh.params['head']['kernel'])
  np.testing.assert_array_equal(state.params['head']['bias'], fresh.params['head']['bias'])
  flat_have = jax.tree_util.tree_flatten_with_path(state.params)[0]
  flat_want = dict(jax.tree_util.tree_flatten_with_path(source['params'])[0])
  compared = 0
  for path, leaf in flat_have:
    if path[0].key != 'head':
      np.testing.assert_array_equal(leaf, flat_want[path])
      compared += 1
  assert compared == len(flat_have) - 2
  for have_leaf, want_leaf in zip(jax.tree.leaves(state.batch_stats),
                                  jax.tree.leaves(source['batch_stats'])):
    np.testing.assert_array_equal(have_leaf, want_leaf)
  # This run's average starts at the loaded weights.
  for have_leaf, want_leaf in zip(jax.tree.leaves(state.ema_params),
                                  jax.tree.leaves({'params': state.params,
                                                   'batch_stats': state.batch_stats})):
    np.testing.assert_array_equal(have_leaf, want_leaf)


@pytest.mark.parametrize('field, value', [('model.width_multiplier', 0.5),
                                          ('model.name', 'mobilenet_v2'),
                                          ('model.activation', 'relu6')])
def test_another_architecture_is_refused_naming_the_field(source_run, field, value, tmp_path):
  config = model_config(10, 3, 16, **{field: value})
  config.init_from = str(source_run[0])
  with pytest.raises(UserError, match=f'config.{field}=') as raised:
    init_from.check_before_start(config, str(tmp_path / 'run'))
  assert '\n' not in str(raised.value)
  config.init_from = str(tmp_path / 'nothing_here')
  with pytest.raises(UserError, match='not a folder'):
    init_from.check_before_start(config, str(tmp_path / 'run'))


def fashion_mnist_config(data_dir: str, source: pathlib.Path, **overrides):
  config = model_config(10, 1, 16, **overrides)
  config.dataset = 'fashion_mnist'
  config.data_dir = data_dir
  config.init_from = str(source)
  config.batch_size = 32
  config.eval_batch_size = 1000
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 1000
  config.schedule.warmup_epochs = 0.0
  return config


@pytest.mark.slow
def test_train_starts_from_init_from_and_a_resume_ignores_it(source_run, fashion_mnist_data_dir,
                                                             tmp_path, caplog):
  """Through train_and_evaluate: step 0 from the source; once there is a checkpoint, resume wins."""
  config = fashion_mnist_config(fashion_mnist_data_dir, source_run[0])
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'init_from: the EMA weights and BatchNorm statistics of step 7' in caplog.text
  assert 'the classifier is initialized afresh (12 classes there, 10 here)' in caplog.text
  assert 'summed over its RGB input channels' in caplog.text
  caplog.clear()
  longer = fashion_mnist_config(fashion_mnist_data_dir, tmp_path / 'gone', num_train_steps=4)
  train.train_and_evaluate(longer, str(tmp_path / 'run'))  # The source folder need not exist.
  assert 'is not read' in caplog.text and 'resuming at step 2' in caplog.text
  assert 'init_from: the EMA weights' not in caplog.text
