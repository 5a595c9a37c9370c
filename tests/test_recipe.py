"""The training recipe, component by component, against the implementation that defines its convention.

RMSprop and the staircase decay as TensorFlow (TF-slim's ImageNet recipe,
tf.compat.v1) computes them, warmup, AdamW, label smoothing and gradient
clipping as Keras does, each over several steps; and which parameters weight
decay reaches, for every architecture. TensorFlow and Keras are imported in
the tests only.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mobilenet.models import architectures
from mobilenet.models.mobilenet import create_model
from mobilenet.training import config_base, optim
from mobilenet.training.train_step import cross_entropy

STEPS = 8


def _config(name, **optimizer):
  config = config_base.base_config()
  config.optimizer.name = name
  config.optimizer.weight_decay = 0.0
  config.schedule.warmup_epochs = 0.0
  config.optimizer.update(optimizer)
  return config


def _params(seed=0):
  """A small tree with one decaying kernel and parameters that never decay."""
  rng = np.random.default_rng(seed)
  return {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
          'bn': {'scale': (1 + 0.1 * rng.normal(size=(4,))).astype(np.float32),
                 'bias': rng.normal(size=(4,)).astype(np.float32)},
          'head': {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
                   'bias': rng.normal(size=(3,)).astype(np.float32)}}


def _gradients(params, steps=STEPS, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: (scale * rng.normal(size=p.shape)).astype(np.float32), params)
          for _ in range(steps)]


def _run_optax(tx, params, gradients):
  """Params after each step of `tx` on the given gradients."""
  state = tx.init(params)
  trajectory = []
  for grads in gradients:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(jax.device_get(params))
  return trajectory


def _paths(tree):
  return list(traverse_util.flatten_dict(tree).keys())


def _assert_trajectories_close(ours, reference, rtol=1e-5, atol=1e-6):
  for step, (a, b) in enumerate(zip(ours, reference)):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    for path in flat_a:
      np.testing.assert_allclose(flat_a[path], flat_b[path], rtol=rtol, atol=atol,
                                 err_msg=f'step {step + 1}, {"/".join(path)}')


def _tf_trajectory(optimizer_step, params, gradients, decay=None):
  """Runs a TF/Keras optimizer: `optimizer_step(pairs, step)` applies one step."""
  import tensorflow as tf
  paths = _paths(params)
  flat = traverse_util.flatten_dict(params)
  variables = {path: tf.Variable(flat[path]) for path in paths}
  trajectory = []
  for step, grads in enumerate(gradients):
    flat_grads = traverse_util.flatten_dict(grads)
    pairs = []
    for path in paths:
      grad = tf.constant(flat_grads[path])
      if decay is not None and decay.get(path):
        # TF-slim's L2 regularizer adds weight_decay * ||w||^2 / 2 to the loss.
        grad = grad + decay[path] * variables[path]
      pairs.append((grad, variables[path]))
    optimizer_step(pairs, step)
    trajectory.append(traverse_util.unflatten_dict(
        {path: variables[path].numpy() for path in paths}))
  return trajectory


def test_rmsprop_matches_tensorflow_rmsprop_with_a_changing_learning_rate():
  """TF-slim's RMSPropOptimizer: eps inside the sqrt, ms starting at 1, lr inside the momentum.

  With a learning rate that changes between steps (the staircase schedule,
  warmup), the momentum accumulates lr * g / sqrt(ms + eps) in TensorFlow, not
  g / sqrt(ms + eps) later scaled by the current rate.
  """
  import tensorflow as tf
  rates = np.array([0.1, 0.1, 0.05, 0.05, 0.2, 0.01, 0.01, 0.1], np.float32)
  schedule = lambda step: jnp.asarray(rates)[step]
  config = _config('rmsprop', momentum=0.9, rmsprop_decay=0.9, rmsprop_epsilon=1.0,
                   weight_decay=4e-5)
  params = _params()
  gradients = _gradients(params)
  ours = _run_optax(optim.create_optimizer(config, schedule), params, gradients)

  step_holder = {'step': 0}
  reference = tf.compat.v1.train.RMSPropOptimizer(
      learning_rate=lambda: float(rates[step_holder['step']]), decay=0.9, momentum=0.9,
      epsilon=1.0)

  def apply(pairs, step):
    step_holder['step'] = step
    reference.apply_gradients(pairs)

  decay = {path: 4e-5 for path in _paths(params) if path[-1] == 'kernel'}
  _assert_trajectories_close(ours, _tf_trajectory(apply, params, gradients, decay))


def test_rmsprop_small_epsilon_matches_tensorflow():
  """Where eps inside vs outside the square root differs most: small mean squares.

  A fast decay forgets the initial mean square of 1 within the 20 steps, and
  the comparison is of the distance moved, so a 1e-3 epsilon in the wrong
  place would show.
  """
  import tensorflow as tf
  config = _config('rmsprop', momentum=0.0, rmsprop_decay=0.5, rmsprop_epsilon=1e-3)
  params = _params(2)
  gradients = _gradients(params, steps=20, seed=3, scale=1e-2)
  schedule = optax.constant_schedule(0.01)
  ours = _run_optax(optim.create_optimizer(config, schedule), params, gradients)
  reference = tf.compat.v1.train.RMSPropOptimizer(0.01, decay=0.5, momentum=0.0, epsilon=1e-3)
  theirs = _tf_trajectory(lambda pairs, step: reference.apply_gradients(pairs), params, gradients)
  moved = lambda trajectory: [jax.tree.map(lambda p, p0: p - p0, point, params)
                              for point in trajectory]
  _assert_trajectories_close(moved(ours), moved(theirs), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('decay_epochs,steps_per_epoch', [(2.5, 10), (1.0, 7), (0.3, 10)])
def test_staircase_exponential_decay_matches_tensorflow(decay_epochs, steps_per_epoch):
  import tensorflow as tf
  import keras
  config = _config('rmsprop')
  config.schedule.name = 'exponential'
  config.schedule.decay_rate = 0.94
  config.schedule.decay_epochs = decay_epochs
  config.optimizer.learning_rate = 0.045
  ours = optim.learning_rate_schedule(config, steps_per_epoch, 1000)
  # TF-slim: decay_steps = int(num_samples_per_epoch / batch_size * num_epochs_per_decay).
  decay_steps = int(steps_per_epoch * decay_epochs)
  keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.045, decay_steps, 0.94,
                                                               staircase=True)
  for step in list(range(0, 3 * decay_steps + 2)) + [99, 500]:
    expected = tf.compat.v1.train.exponential_decay(0.045, step, decay_steps, 0.94,
                                                    staircase=True)
    expected = float(expected() if callable(expected) else expected)
    np.testing.assert_allclose(float(ours(step)), expected, rtol=1e-6, err_msg=f'step {step}')
    np.testing.assert_allclose(float(ours(step)), float(keras_schedule(step)), rtol=1e-6)


def test_warmup_then_cosine_matches_keras():
  """Linear warmup from 0 to the peak, then cosine over the remaining steps: Keras' CosineDecay."""
  import keras
  config = _config('sgd')
  config.schedule.name = 'cosine'
  config.schedule.warmup_epochs = 2
  config.optimizer.learning_rate = 0.4
  steps_per_epoch, total = 5, 40
  ours = optim.learning_rate_schedule(config, steps_per_epoch, total)
  reference = keras.optimizers.schedules.CosineDecay(
      0.0, decay_steps=total - 10, warmup_target=0.4, warmup_steps=10)
  for step in range(total + 3):
    np.testing.assert_allclose(float(ours(step)), float(reference(step)), rtol=1e-5, atol=1e-7,
                               err_msg=f'step {step}')


def test_warmup_then_constant_and_exponential():
  """Warmup reaches the peak at its last step; the decay then starts from the peak."""
  import tensorflow as tf
  for name in ('constant', 'exponential'):
    config = _config('sgd')
    config.schedule.name = name
    config.schedule.warmup_epochs = 1
    config.schedule.decay_epochs = 2
    config.optimizer.learning_rate = 0.2
    ours = optim.learning_rate_schedule(config, 4, 100)
    np.testing.assert_allclose([float(ours(step)) for step in range(5)],
                               [0.0, 0.05, 0.1, 0.15, 0.2], rtol=1e-6)
    for step in range(4, 30):
      expected = 0.2 if name == 'constant' else float(
          tf.compat.v1.train.exponential_decay(0.2, step - 4, 8, 0.94, staircase=True)())
      np.testing.assert_allclose(float(ours(step)), expected, rtol=1e-6)


def _architecture_params(name, conv_type='separable'):
  config = config_base.base_config()
  config.model.name = name
  config.model.conv_type = conv_type
  config.model.width_multiplier = 0.25
  config.model.resolution = 32
  model = create_model(config.model)
  # Three input channels: the stem is then the one 3x3 kernel with more than one input channel
  # per group besides the dense convolutions, so depthwise kernels are exactly (k, k, 1, C).
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                train=False))
  return variables['params']


ARCHITECTURES = [(name, 'separable') for name in architectures.NAMES] + [('mobilenet_v1', 'standard')]


@pytest.mark.parametrize('name,conv_type', ARCHITECTURES)
def test_weight_decay_mask_for_every_architecture(name, conv_type):
  """Conv, pointwise and dense kernels decay; depthwise only when asked; BN and biases never.

  Checked both on the mask and through the optimizer: with zero gradients,
  SGD moves exactly the decaying parameters, by lr * weight_decay * w.
  """
  shapes = _architecture_params(name, conv_type)
  flat = traverse_util.flatten_dict(shapes)
  depthwise = {path for path, leaf in flat.items()
               if path[-1] == 'kernel' and leaf.ndim == 4 and leaf.shape[2] == 1}
  kernels = {path for path in flat if path[-1] == 'kernel'}
  assert kernels - depthwise
  assert bool(depthwise) == (conv_type == 'separable')
  assert any(path[-1] == 'scale' for path in flat) and any(path[-1] == 'bias' for path in flat)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  for decay_depthwise in (False, True):
    expected = kernels if decay_depthwise else kernels - depthwise
    mask = traverse_util.flatten_dict(optim.weight_decay_mask(params, decay_depthwise))
    assert {path for path, decays in mask.items() if decays} == expected
    config = _config('sgd', momentum=0.0, weight_decay=0.01, decay_depthwise=decay_depthwise)
    tx = optim.create_optimizer(config, optax.constant_schedule(0.5))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for path, update in traverse_util.flatten_dict(updates).items():
      wanted = -0.5 * 0.01 * traverse_util.flatten_dict(params)[path] if path in expected else 0
      np.testing.assert_allclose(update, wanted, rtol=1e-6, atol=1e-9,
                                 err_msg='/'.join(path))


def test_adamw_matches_keras_adamw():
  """Decoupled decay (lr * wd * w, on the masked kernels only), bias-corrected moments, a schedule."""
  import keras
  import tensorflow as tf
  config = _config('adamw', adam_b1=0.9, adam_b2=0.999, weight_decay=0.05)
  config.schedule.name = 'exponential'
  config.schedule.decay_epochs = 1.0
  config.schedule.decay_rate = 0.5
  config.optimizer.learning_rate = 0.01
  schedule = optim.learning_rate_schedule(config, 3, 100)
  params = _params(4)
  gradients = _gradients(params, seed=5)
  ours = _run_optax(optim.create_optimizer(config, schedule), params, gradients)

  reference = keras.optimizers.AdamW(
      learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 3, 0.5, staircase=True),
      weight_decay=0.05, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
  built = {}

  def apply(pairs, step):
    if not built:
      reference.exclude_from_weight_decay(
          var_list=[var for (_, var), path in zip(pairs, _paths(params)) if path[-1] != 'kernel'])
      built['yes'] = True
    reference.apply_gradients(pairs)

  # Keras adds eps to sqrt(v) before the bias correction, optax after: a 1e-8 difference.
  _assert_trajectories_close(ours, _tf_trajectory(apply, params, gradients), rtol=1e-5, atol=1e-6)
  del tf


def test_gradient_clipping_matches_keras_global_clipnorm():
  """Clipping by the global norm over all parameters (large and small gradients alike)."""
  import keras
  config = _config('sgd', momentum=0.9, nesterov=True, grad_clip_norm=1.0)
  params = _params(6)
  # Steps with a global norm far above the threshold and some below it.
  gradients = [jax.tree.map(lambda g, s=s: g * s, grads)
               for grads, s in zip(_gradients(params, seed=7), [3.0, 0.05, 1.0, 0.01, 10.0] * 2)]
  schedule = optax.constant_schedule(0.1)
  ours = _run_optax(optim.create_optimizer(config, schedule), params, gradients)
  reference = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True, global_clipnorm=1.0)
  _assert_trajectories_close(
      ours, _tf_trajectory(lambda pairs, step: reference.apply_gradients(pairs), params,
                           gradients), rtol=1e-5, atol=1e-6)
  # The threshold binds: without clipping the first step moves much further.
  unclipped = _run_optax(optim.create_optimizer(_config('sgd', momentum=0.9, nesterov=True),
                                                schedule), params, gradients[:1])
  assert not np.allclose(unclipped[0]['head']['kernel'], ours[0]['head']['kernel'])


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3])
def test_label_smoothing_matches_keras_and_optax(smoothing):
  import keras
  rng = np.random.default_rng(8)
  logits = (3 * rng.normal(size=(16, 10))).astype(np.float32)
  labels = rng.integers(0, 10, size=16).astype(np.int32)
  ours = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 10, smoothing)
  one_hot = np.eye(10, dtype=np.float32)[labels]
  keras_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing,
                                                    reduction=None)
  np.testing.assert_allclose(ours, np.asarray(keras_loss(one_hot, logits)), rtol=1e-5, atol=1e-6)
  smoothed = optax.smooth_labels(jnp.asarray(one_hot), smoothing)
  np.testing.assert_allclose(ours, optax.softmax_cross_entropy(jnp.asarray(logits), smoothed),
                             rtol=1e-6, atol=1e-6)
  # The smoothed target: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere.
  np.testing.assert_allclose(smoothed.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(smoothed[np.arange(16), labels], 1 - smoothing + smoothing / 10,
                             rtol=1e-6)


def test_ema_averages_weights_and_batch_norm_statistics_and_eval_uses_both():
  """TF's ExponentialMovingAverage(num_updates=step) over params and BatchNorm statistics."""
  from mobilenet.training import train_step as train_step_lib
  config = _config('sgd', learning_rate=0.1)
  config.ema_decay = 0.9
  config.model.width_multiplier, config.model.resolution = 0.25, 8
  model = create_model(config.model)
  tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
  state = train_step_lib.create_train_state(model, tx, config, (8, 8, 1))
  step = jax.jit(lambda s, b: train_step_lib.train_step(
      s, b, model=model, tx=tx, schedule=optax.constant_schedule(0.1), config=config))
  rng = np.random.default_rng(0)
  want_params, want_stats = state.params, state.batch_stats
  for n in range(4):
    batch = {'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
             'label': rng.integers(0, 10, 8).astype(np.int32)}
    state, _ = step(state, batch)
    keep = min(0.9, (1 + n) / (10 + n))
    want_params, want_stats = jax.tree.map(lambda avg, new: keep * avg + (1 - keep) * new,
                                           (want_params, want_stats),
                                           (state.params, state.batch_stats))
  jax.tree.map(lambda have, want: np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6),
               (state.ema_params['params'], state.ema_params['batch_stats']),
               (want_params, want_stats))
  assert not np.allclose(jax.tree.leaves(state.ema_params['batch_stats'])[0],
                         jax.tree.leaves(state.batch_stats)[0])
  batch = {**batch, 'mask': np.ones(8, bool)}
  apply = lambda variables, images: model.apply(variables, images, train=False)
  sums = train_step_lib.eval_step(state, batch, apply_fn=apply, config=config, use_ema=True)
  logits = apply({'params': want_params, 'batch_stats': want_stats}, batch['image'])
  want_loss = cross_entropy(logits, batch['label'], 10, 0.0).sum()
  np.testing.assert_allclose(sums['loss_sum'], want_loss, rtol=1e-4)


def test_train_state_keeps_the_checkpoint_layout_of_earlier_runs():
  """Orbax restores by field: a new field would make every earlier run's checkpoint unreadable."""
  import dataclasses
  from mobilenet.training.train_step import TrainState
  assert [field.name for field in dataclasses.fields(TrainState)] == [
      'step', 'params', 'batch_stats', 'opt_state', 'ema_params']
