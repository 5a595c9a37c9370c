"""BatchNormActivation (both implementations) against activation(nn.BatchNorm); the stem's
convolution implementations against XLA's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.ops import batch_norm
from mobilenet.ops.cpu import kernels as cpu_kernels

IMPLEMENTATIONS = ['xla'] + (['cpu_kernel'] if cpu_kernels.available() else [])


class _FlaxReference(nn.Module):
  """What the model computed before BatchNormActivation: Flax's BatchNorm, then the activation."""
  use_running_average: bool
  activation: object

  @nn.compact
  def __call__(self, x):
    return self.activation(nn.BatchNorm(self.use_running_average, momentum=0.9, epsilon=1e-3,
                                        name='bn')(x))


class _Ours(nn.Module):
  use_running_average: bool
  activation: object
  implementation: str
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    return batch_norm.BatchNormActivation(self.use_running_average, momentum=0.9, epsilon=1e-3,
                                          activation=self.activation, dtype=self.dtype,
                                          implementation=self.implementation, name='bn')(x)


def _random_state(rng, channels):
  """Non-trivial parameters and running statistics, so that every term is exercised."""
  return ({'bn': {'scale': jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
                  'bias': jnp.asarray(rng.normal(0, 0.5, channels), jnp.float32)}},
          {'bn': {'mean': jnp.asarray(rng.normal(0, 0.3, channels), jnp.float32),
                  'var': jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32)}})


def _train_outputs(module, params, stats, x, cotangent):
  """(output, new batch stats, gradients w.r.t. x and params) in training mode."""
  def loss(p, x):
    y, updates = module.apply({'params': p, 'batch_stats': stats}, x, mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32) * cotangent), (y, updates['batch_stats'])
  (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, new_stats, grads


def _assert_training_matches_flax(implementation, activation, shape, seed):
  rng = np.random.default_rng(seed)
  params, stats = _random_state(rng, shape[-1])
  # Shifted, scaled inputs (as after a convolution), so a share of them lands past 0 and 6.
  x = jnp.asarray(rng.normal(1.0, 3.0, shape), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  expected = _train_outputs(_FlaxReference(False, activation), params, stats, x, cotangent)
  got = _train_outputs(_Ours(False, activation, implementation), params, stats, x, cotangent)
  for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(have, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('activation', [nn.relu, jax.nn.relu6, batch_norm.identity,
                                        jax.nn.hard_swish],
                         ids=['relu', 'relu6', 'none', 'hard_swish'])
@pytest.mark.parametrize('shape', [(4, 5, 7, 3), (6, 3, 3, 33), (10, 16)])
def test_training_matches_flax_batch_norm(implementation, activation, shape):
  _assert_training_matches_flax(implementation, activation, shape, seed=sum(shape))


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('activation', [jax.nn.relu6, jax.nn.hard_swish], ids=['relu6', 'hard_swish'])
def test_inference_matches_flax_batch_norm(implementation, activation):
  rng = np.random.default_rng(0)
  params, stats = _random_state(rng, 12)
  x = jnp.asarray(rng.normal(0.5, 4.0, (3, 4, 4, 12)), jnp.float32)
  variables = {'params': params, 'batch_stats': stats}
  expected = _FlaxReference(True, activation).apply(variables, x)
  got = _Ours(True, activation, implementation).apply(variables, x)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  # Gradients through inference mode (per-example gradients, attribution).
  want = jax.grad(lambda x: jnp.sum(_FlaxReference(True, activation).apply(variables, x) ** 2))(x)
  have = jax.grad(lambda x: jnp.sum(_Ours(True, activation, implementation).apply(variables, x)
                                    ** 2))(x)
  np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_xla_implementation_takes_any_activation():
  _assert_training_matches_flax('xla', nn.gelu, (8, 5), seed=1)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_bfloat16_stays_close_to_float32(implementation):
  rng = np.random.default_rng(2)
  params, stats = _random_state(rng, 16)
  # The same (bfloat16-representable) inputs for both, so that only the
  # bfloat16 output and incoming gradient differ.
  x = jnp.asarray(rng.normal(1.0, 3.0, (4, 6, 6, 16)), jnp.bfloat16).astype(jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  want_y, _, want_grads = _train_outputs(_Ours(False, nn.relu, implementation), params, stats, x,
                                         cotangent)
  y, _, grads = _train_outputs(_Ours(False, nn.relu, implementation, jnp.bfloat16), params, stats,
                               x.astype(jnp.bfloat16), cotangent)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), want_y, rtol=2e-2, atol=2e-2)
  for want, have in zip(jax.tree.leaves(want_grads), jax.tree.leaves(grads)):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(have, np.float32), want, atol=3e-2 * scale)


def test_same_variables_as_flax_batch_norm():
  x = jnp.ones((2, 3, 3, 7))
  expected = _FlaxReference(False, nn.relu).init(jax.random.key(0), x)
  got = _Ours(False, nn.relu, 'xla').init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == jax.tree.map(
      lambda a: (a.shape, a.dtype), expected)
  for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(have, want)


def test_cpu_kernel_rejects_an_activation_it_cannot_compute():
  if not cpu_kernels.available():
    pytest.skip(f'C++ kernels unavailable: {cpu_kernels.error()}')
  with pytest.raises(ValueError, match='ReLU, ReLU6, hard-swish and no activation only'):
    _Ours(False, nn.gelu, 'cpu_kernel').init(jax.random.key(0), jnp.ones((2, 3)))


def test_auto_picks_the_kernel_on_cpu_for_the_activations_it_computes():
  expected = 'cpu_kernel' if cpu_kernels.available() else 'xla'
  for activation in (nn.relu, jax.nn.relu6, jax.nn.hard_swish, batch_norm.identity):
    assert batch_norm.resolve_implementation('auto', activation, 'cpu') == expected
  assert batch_norm.resolve_implementation('auto', nn.gelu, 'cpu') == 'xla'
  assert batch_norm.resolve_implementation('auto', nn.relu, 'gpu') == 'xla'
  with pytest.raises(ValueError, match='unknown batch_norm implementation'):
    batch_norm.resolve_implementation('fast', nn.relu)
