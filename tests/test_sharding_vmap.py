"""The C++ kernels on a mesh (each device its own shard of the batch) and under jax.vmap.

ops/cpu/calls.py wraps every kernel call: without it XLA gathers the global
batch onto every device before each call, and `jax.vmap` raises
NotImplementedError. Per-example gradients (`vmap(grad)`) must equal a loop
over the examples, op by op.
"""
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.ops import batch_norm, convolution, depthwise, norm_depthwise, pointwise
from mobilenet.ops.cpu import kernels as cpu_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f'C++ kernels unavailable: {cpu_kernels.error()}')

SHARDED_STEP = r'''
import functools
import jax, jax.numpy as jnp, numpy as np
from mobilenet.training import config_base, optim, parallel
from mobilenet.models.mobilenet import create_model
from mobilenet.ops import depthwise
from mobilenet.training.train_step import create_train_state, train_step

mesh = parallel.create_mesh()
assert mesh.size == 4
sharded = parallel.batch_sharding(mesh)

# The check below can fail: a kernel called outside the mesh context gathers.
x = jax.device_put(jnp.ones((8, 8, 8, 16)), sharded)
w = jnp.ones((3, 3, 1, 16))
grad = lambda x, w: jax.grad(lambda x, w: jnp.sum(
    depthwise.depthwise_conv(x, w, implementation='cpu_kernel') ** 2), (0, 1))(x, w)
assert 'all-gather' in jax.jit(grad).lower(x, w).compile().as_text()
assert 'all-gather' not in jax.jit(parallel.on_mesh(mesh, grad)).lower(x, w).compile().as_text()

for name in ('mobilenet_v1', 'mobilenet_v2'):
  config = config_base.base_config()
  config.model.name = name
  config.model.width_multiplier = 0.25
  config.model.resolution = 16
  config.batch_size = 8
  model = create_model(config.model)
  schedule = optim.learning_rate_schedule(config, 100, 1000)
  tx = optim.create_optimizer(config, schedule)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
           'label': rng.integers(0, 10, size=8).astype(np.int32)}
  results = {}
  for devices in (1, 4):
    mesh = parallel.create_mesh(jax.devices()[:devices])
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = jax.jit(functools.partial(create_train_state, model, tx, config, (16, 16, 1)),
                    out_shardings=replicated)()
    step = jax.jit(parallel.on_mesh(mesh, functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, config=config)),
        in_shardings=(replicated, sharded), out_shardings=(replicated, replicated))
    global_batch = parallel.global_batch(batch, sharded)
    hlo = step.lower(state, global_batch).compile().as_text()
    gathers = [line.strip()[:200] for line in hlo.splitlines() if 'all-gather' in line]
    assert not gathers, (name, gathers[:5])
    assert 'mobilenet_depthwise_forward' in hlo and 'mobilenet_batch_norm_stats' in hlo
    if name == 'mobilenet_v2':  # The expansion's BatchNorm inside the depthwise kernel, sharded.
      assert 'mobilenet_depthwise_activated_backward' in hlo
    if devices > 1:
      assert 'all-reduce' in hlo  # The filter gradients' and statistics' partial sums.
    new_state, metrics = step(state, global_batch)
    grads = jax.tree.map(lambda new, old: new - old, new_state.params, state.params)
    results[devices] = jax.device_get((metrics['loss'], grads, new_state.batch_stats))
  (loss1, grads1, stats1), (loss4, grads4, stats4) = results[1], results[4]
  np.testing.assert_allclose(loss1, loss4, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads4)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  print(name, 'sharded without gathers, same as one device', float(loss1))
'''


@pytest.mark.slow
def test_multi_device_train_step_runs_kernels_on_local_shards():
  """MobileNetV1 and V2 on 4 devices: no all-gather, same loss, gradients and statistics as 1."""
  result = subprocess.run(
      [sys.executable, '-c', SHARDED_STEP], capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
           'PYTHONPATH': str(ROOT)})
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ('mobilenet_v1', 'mobilenet_v2'):
    assert f'{name} sharded without gathers, same as one device' in result.stdout


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def assert_per_example_grads_match_loop(loss, params, examples, rtol=1e-4, atol=1e-5):
  """jax.vmap(jax.grad(loss)) over examples (each a batch of one) == grad per example in a loop."""
  grad = jax.grad(loss, argnums=(0, 1))
  vmapped = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(params, examples[:, None])
  for index in range(examples.shape[0]):
    looped = grad(params, examples[index:index + 1])
    expected_leaves, tree = jax.tree.flatten(looped)
    actual_leaves = jax.tree.leaves(jax.tree.map(lambda v: v[index], vmapped))
    assert jax.tree.structure(jax.tree.map(lambda v: v[index], vmapped)) == tree
    for actual, expected in zip(actual_leaves, expected_leaves):
      np.testing.assert_allclose(actual, expected.reshape(actual.shape), rtol=rtol, atol=atol)


@pytest.mark.parametrize('strides,multiplier', [((1, 1), 1), ((2, 2), 1), ((1, 1), 2)])
def test_depthwise_per_example_gradients(strides, multiplier):
  kernel = _random((3, 3, 1, 8 * multiplier), 0)
  images = _random((4, 8, 8, 8), 1)

  def loss(kernel, x):
    y = depthwise.depthwise_conv(x, kernel, strides=strides, implementation='cpu_kernel')
    return jnp.sum(jnp.sin(y))

  assert_per_example_grads_match_loop(loss, kernel, images)


def test_depthwise_forward_under_vmap_equals_xla():
  kernel = _random((3, 3, 1, 8), 0)
  images = _random((3, 2, 8, 8, 8), 1)  # 3 independent batches of 2.
  conv = lambda impl: jax.vmap(lambda x: depthwise.depthwise_conv(
      x, kernel, strides=(2, 2), implementation=impl))(images)
  np.testing.assert_allclose(conv('cpu_kernel'), conv('xla'), rtol=1e-5, atol=1e-5)


def test_pointwise_per_example_gradients():
  kernel = _random((8, 16), 0)
  images = _random((4, 4, 4, 8), 1)
  loss = lambda kernel, x: jnp.sum(jnp.sin(pointwise.pointwise_conv(x, kernel,
                                                                    implementation='cpu_kernel')))
  assert_per_example_grads_match_loop(loss, kernel, images)


@pytest.mark.parametrize('strides', [1, 2])
def test_stem_convolution_per_example_gradients(strides):
  kernel = _random((3, 3, 1, 8), 0)
  images = _random((4, 16, 16, 1), 1)
  loss = lambda kernel, x: jnp.sum(jnp.sin(convolution.conv(x, kernel, strides=strides,
                                                            implementation='cpu_kernel')))
  assert_per_example_grads_match_loop(loss, kernel, images)


@pytest.mark.parametrize('activation', [nn.relu, jax.nn.relu6, None])
def test_batch_norm_inference_per_example_gradients(activation):
  module = batch_norm.BatchNormActivation(use_running_average=True, activation=activation,
                                          implementation='cpu_kernel')
  images = 3 * _random((4, 4, 4, 8), 1)
  stats = {'mean': _random((8,), 2), 'var': jnp.exp(_random((8,), 3))}
  params = {'scale': 1 + _random((8,), 4), 'bias': _random((8,), 5)}
  loss = lambda params, x: jnp.sum(jnp.sin(module.apply({'params': params, 'batch_stats': stats}, x)))
  assert_per_example_grads_match_loop(loss, params, images)
  # And the same values as XLA's form.
  reference = batch_norm.BatchNormActivation(use_running_average=True, activation=activation,
                                             implementation='xla')
  variables = {'params': params, 'batch_stats': stats}
  np.testing.assert_allclose(jax.vmap(lambda x: module.apply(variables, x))(images[:, None]),
                             reference.apply(variables, images)[:, None], rtol=1e-5, atol=1e-5)


def test_batch_norm_training_vmapped_over_independent_batches():
  """Train mode under vmap over a leading axis of batches: each batch its own statistics."""
  module = batch_norm.BatchNormActivation(use_running_average=False, activation=jax.nn.relu6,
                                          momentum=0.9, implementation='cpu_kernel')
  batches = 2 * _random((3, 8, 4, 4, 8), 1) + 0.5
  variables = module.init(jax.random.key(0), batches[0])
  params = {'scale': 1 + 0.1 * _random((8,), 4), 'bias': 0.1 * _random((8,), 5)}

  def loss(params, x):
    y, updates = module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y)), updates['batch_stats']

  grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
  vmapped_grads, vmapped_stats = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(params, batches)
  for index in range(batches.shape[0]):
    grads, stats = grad(params, batches[index])
    for actual, expected in zip(jax.tree.leaves(jax.tree.map(lambda v: v[index], vmapped_grads)),
                                jax.tree.leaves(grads)):
      np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    for actual, expected in zip(jax.tree.leaves(jax.tree.map(lambda v: v[index], vmapped_stats)),
                                jax.tree.leaves(stats)):
      np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
  # Each batch's statistics are its own (not pooled over the vmapped axis).
  expected_mean = 0.9 * 0 + 0.1 * jnp.mean(batches, axis=(1, 2, 3))
  np.testing.assert_allclose(vmapped_stats['mean'], expected_mean, rtol=1e-4, atol=1e-6)


def test_fused_norm_depthwise_training_vmapped_over_independent_batches():
  """BatchNorm fused into the depthwise layer (ops/norm_depthwise.py) under vmap: per batch."""
  batches = 2 * _random((3, 4, 6, 6, 16), 1) + 0.5
  params = (1 + 0.1 * _random((16,), 4), 0.1 * _random((16,), 5), _random((3, 3, 1, 16), 2))

  def loss(params, x):
    scale, bias, kernel = params
    after = norm_depthwise.DepthwiseAfter(kernel, (1, 1), 'SAME', 'cpu_kernel')
    y, mean, var = after.fused_train(x, scale, bias, 1e-3, jax.nn.relu6)
    return jnp.sum(jnp.sin(y)), (mean, var)

  grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
  vmapped = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(params, batches)
  for index in range(batches.shape[0]):
    for actual, expected in zip(jax.tree.leaves(jax.tree.map(lambda v: v[index], vmapped)),
                                jax.tree.leaves(grad(params, batches[index]))):
      np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_fused_depthwise_inference_per_example_gradients(strides):
  kernel = _random((3, 3, 1, 8), 0)
  images = _random((4, 8, 8, 8), 1)
  params = {'kernel': kernel, 'in': (1 + 0.1 * _random((8,), 2), _random((8,), 3)),
            'out': (1 + 0.1 * _random((8,), 4), _random((8,), 5))}

  def loss(params, x):
    y = depthwise.depthwise_conv_inference(x, params['kernel'], input_affine=params['in'],
                                           output_affine=params['out'], input_activation=jax.nn.relu6,
                                           output_activation=jax.nn.relu6,
                                           strides=strides)
    return jnp.sum(jnp.sin(y))

  # The kernel path is taken (3x3, multiplier 1, a multiple of 8 channels).
  hlo = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0))).lower(params, images[:, None]).as_text()
  assert 'mobilenet_depthwise_inference' in hlo
  assert_per_example_grads_match_loop(loss, params, images)
