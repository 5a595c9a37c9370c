"""The 'fast' ops compute what the 'plain' Flax ops compute, for every architecture."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.models import architectures
from mobilenet.models.mobilenet import MobileNet
from mobilenet.ops import op_sets

# Large enough that BatchNorm's batch statistics in the last (2x2) layers are over 32 values:
# over a handful, a variance near zero amplifies any difference in summation order.
BATCH, SIZE = 8, 32


def model(name: str, ops: str, **kwargs) -> MobileNet:
  plan = architectures.plan(name, width_multiplier=0.5, form='cifar', **kwargs)
  return MobileNet(plan=plan, num_classes=7, ops=ops)


def train_mode(net: MobileNet, variables, images):
  """Logits and updated BatchNorm statistics in training mode (batch statistics)."""
  logits, updates = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, images)
  return logits, updates['batch_stats']


def inference_grads(net: MobileNet, variables, images):
  """Gradients of a loss of the inference-mode logits with respect to the parameters."""
  def loss(params):
    logits = net.apply({'params': params, 'batch_stats': variables['batch_stats']}, images)
    return jnp.sum(jnp.sin(logits))
  return jax.jit(jax.grad(loss))(variables['params'])


def scaled_close(have, want, tolerance: float) -> None:
  """Equal up to `tolerance` times the largest magnitude of `want` (per array)."""
  np.testing.assert_allclose(have, want, rtol=tolerance,
                             atol=tolerance * float(jnp.max(jnp.abs(want))))


def relative_l2(have, want) -> float:
  """||have - want|| / ||want||: robust to the odd ReLU that one float path puts on the other side
  of zero (a wrong gradient formula errs by O(1))."""
  want = np.asarray(want, np.float64)
  return float(np.linalg.norm(np.asarray(have, np.float64) - want) /
               max(np.linalg.norm(want), 1e-12))


@pytest.mark.slow
@pytest.mark.parametrize('name', architectures.NAMES)
def test_fast_ops_equal_plain_ops(name):
  images = jax.random.normal(jax.random.key(1), (BATCH, SIZE, SIZE, 3))
  plain, fast = model(name, 'plain'), model(name, 'fast')
  variables = jax.jit(plain.init)(jax.random.key(0), images)
  fast_variables = jax.jit(fast.init)(jax.random.key(0), images)
  # Same parameters from the same seed: the op set never changes the tree.
  jax.tree.map(np.testing.assert_array_equal, variables, fast_variables)
  # Running statistics moved off their initial values, as in a trained network.
  variables = {**variables, 'batch_stats': train_mode(plain, variables, images)[1]}

  scaled_close(jax.jit(fast.apply)(variables, images), jax.jit(plain.apply)(variables, images),
               1e-4)
  errors = jax.tree.map(relative_l2, inference_grads(fast, variables, images),
                        inference_grads(plain, variables, images))
  assert max(jax.tree.leaves(errors)) < 1e-2, errors
  # Batch statistics through 14-20 layers amplify summation-order differences (at
  # initialization a network with BatchNorm in training mode is close to chaotic, so its
  # gradients are compared in inference mode above; each op's own gradients are checked
  # against float64 in its test file).
  (have_logits, have_stats), (want_logits, want_stats) = (train_mode(fast, variables, images),
                                                          train_mode(plain, variables, images))
  assert relative_l2(have_logits, want_logits) < 1e-2
  # Over all statistics at once: a channel mean near zero has no relative precision of its own.
  assert relative_l2(np.concatenate([np.ravel(x) for x in jax.tree.leaves(have_stats)]),
                     np.concatenate([np.ravel(x) for x in jax.tree.leaves(want_stats)])) < 1e-3


def test_relu6_and_bfloat16_on_both_op_sets():
  images = jax.random.normal(jax.random.key(1), (BATCH, SIZE, SIZE, 3))
  plan = architectures.plan('mobilenet_v1', width_multiplier=0.25, form='cifar',
                            activation='relu6')
  outputs = {}
  for ops in op_sets.OP_SETS:
    net = MobileNet(plan=plan, num_classes=7, ops=ops, dtype=jnp.bfloat16)
    variables = net.init(jax.random.key(0), images)
    outputs[ops] = net.apply(variables, images)
    assert outputs[ops].dtype == jnp.float32
  np.testing.assert_allclose(outputs['fast'], outputs['plain'], rtol=0.05, atol=0.05)


def test_fast_conv_dispatches_by_layer_kind_with_nn_conv_semantics():
  """Depthwise, pointwise, dense and strided layers equal nn.Conv with the same kernel."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8))
  for features, kernel, strides, groups in ((8, 3, 1, 8), (16, 3, 2, 8), (12, 1, 1, 1),
                                            (16, 3, 2, 1), (8, 5, 2, 8), (8, 3, 1, 2)):
    fast = op_sets.Conv(features, (kernel, kernel), strides, feature_group_count=groups)
    plain = nn.Conv(features, (kernel, kernel), strides, feature_group_count=groups,
                    use_bias=False, padding='SAME')
    variables = fast.init(jax.random.key(1), x)
    assert variables['params']['kernel'].shape == (kernel, kernel, 8 // groups, features)
    np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


def test_unknown_op_set_is_refused():
  with pytest.raises(ValueError, match='unknown op set'):
    op_sets.op_set('cuda', train=False)
