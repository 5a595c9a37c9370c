"""The 'fast' ops compute what the 'plain' Flax ops compute, for every architecture."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.models import architectures
from mobilenet.models.mobilenet import MobileNet
from mobilenet.ops import op_sets

BATCH, SIZE = 4, 16


def model(name: str, ops: str, **kwargs) -> MobileNet:
  plan = architectures.plan(name, width_multiplier=0.5, form='cifar', **kwargs)
  return MobileNet(plan=plan, num_classes=7, ops=ops)


def loss_and_grads(net: MobileNet, variables, images):
  def loss(params):
    logits, updates = net.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                images, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(logits)), (logits, updates['batch_stats'])
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])


@pytest.mark.parametrize('name', architectures.NAMES)
def test_fast_ops_equal_plain_ops(name):
  images = jax.random.normal(jax.random.key(1), (BATCH, SIZE, SIZE, 3))
  plain, fast = model(name, 'plain'), model(name, 'fast')
  variables = jax.jit(plain.init)(jax.random.key(0), images)
  fast_variables = jax.jit(fast.init)(jax.random.key(0), images)
  # Same parameters from the same seed: the op set never changes the tree.
  jax.tree.map(np.testing.assert_array_equal, variables, fast_variables)

  np.testing.assert_allclose(jax.jit(fast.apply)(variables, images),
                             jax.jit(plain.apply)(variables, images), rtol=1e-4, atol=1e-5)
  (want_loss, (want_logits, want_stats)), want_grads = loss_and_grads(plain, variables, images)
  (have_loss, (have_logits, have_stats)), have_grads = loss_and_grads(fast, variables, images)
  # Batch statistics of 4 examples through 14-20 layers amplify summation-order differences.
  np.testing.assert_allclose(have_logits, want_logits, rtol=1e-4,
                             atol=2e-4 * float(jnp.max(jnp.abs(want_logits))))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               have_stats, want_stats)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * scale),
               have_grads, want_grads)


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
