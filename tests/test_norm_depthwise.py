"""Training-mode BatchNorm + activation fused into the depthwise layer computes the two layers' function."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.models import architectures, blocks
from mobilenet.models.mobilenet import MobileNet
from mobilenet.ops import batch_norm, depthwise, norm_depthwise, op_sets
from mobilenet.ops.cpu import kernels as cpu_kernels

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason='needs a C++ compiler')


def relative_l2(have, want) -> float:
  want = np.asarray(want, np.float64)
  return float(np.linalg.norm(np.asarray(have, np.float64) - want) / np.linalg.norm(want))


def two_layers(x, scale, bias, kernel, activation, strides, epsilon=1e-3):
  """The definition in plain XLA: training-mode BatchNorm, the activation, the depthwise layer."""
  mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
  activated = activation((x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias)
  y = depthwise.depthwise_conv(activated, kernel, strides=strides, implementation='xla')
  return y, mean, var


def fused(x, scale, bias, kernel, activation, strides, epsilon=1e-3):
  after = norm_depthwise.DepthwiseAfter(kernel, strides, 'SAME', 'cpu_kernel')
  assert after.fuses(x, activation)
  return after.fused_train(x, scale, bias, epsilon, activation)


@needs_kernels
@pytest.mark.parametrize('size,channels,activation,spatial', [
    (3, 16, jax.nn.relu6, (9, 8)),  # MobileNetV2.
    (3, 24, jax.nn.hard_swish, (8, 7)),  # MobileNetV3's 3x3 layers.
    (5, 8, jax.nn.relu, (9, 9)),  # ... and its 5x5 ones.
    (5, 16, batch_norm.identity, (4, 4)),  # A map no wider than the filter.
    (5, 24, jax.nn.hard_swish, (2, 3)),  # Maps no larger than the filter: V3's last blocks,
    (3, 32, jax.nn.relu6, (2, 2)),  # and V1's at 32x32 (only the taps on the image are taken).
    # Rows too wide for one band in L2: the image is taken in bands, forward and backward.
    (3, 64, jax.nn.relu6, (70, 64)),
    (5, 64, jax.nn.hard_swish, (67, 64)),
])
def test_fused_training_matches_the_two_layers(size, channels, activation, spatial):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(0.5, 2.0, size=(3, *spatial, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(size, size, 1, channels)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32)
  bias = jnp.asarray(rng.normal(0.0, 0.5, channels), jnp.float32)
  # A cotangent for every output, so each gradient sums over all of them.
  weights = jnp.asarray(rng.normal(size=(3, *spatial, channels)), jnp.float32)
  for strides in ((1, 1), (2, 2)):
    have, want = (f(x, scale, bias, kernel, activation, strides) for f in (fused, two_layers))
    assert np.std(want[0]) > 0.1  # The activations were not all clipped away.
    for h, w in zip(have, want):
      np.testing.assert_allclose(h, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))

    def loss(f, *args):
      y = f(*args, activation, strides)[0]
      return jnp.sum(y * weights[:, :y.shape[1], :y.shape[2]])

    have, want = (jax.grad(loss, argnums=(1, 2, 3, 4))(f, x, scale, bias, kernel)
                  for f in (fused, two_layers))
    for name, h, w in zip(('x', 'scale', 'bias', 'kernel'), have, want):
      assert relative_l2(h, w) < 1e-4, (name, strides, relative_l2(h, w))
  # The kernels, not an XLA fallback, computed the gradients.
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(1, 4)), static_argnums=0).lower(
      fused, x, scale, bias, kernel).as_text()
  assert 'mobilenet_depthwise_activated_backward' in hlo
  assert 'mobilenet_depthwise_inference' in hlo
  assert 'mobilenet_batch_norm_apply' not in hlo  # The activated input is never written.
  assert 'mobilenet_batch_norm_backward_sums' not in hlo  # The backward call took them.


@needs_kernels
@pytest.mark.parametrize('size,strides,spatial,padding,activation', [
    (3, 1, (9, 8), 'SAME', jax.nn.hard_swish), (3, 2, (9, 8), 'SAME', jax.nn.relu6),
    (5, 2, (4, 4), 'SAME', jax.nn.hard_swish), (3, 1, (2, 2), 'SAME', jax.nn.relu6),
    # Several bands per image, at stride 2 and at stride 1 (the input gradient by row ranges).
    (3, 2, (70, 64), 'SAME', jax.nn.hard_swish), (3, 1, (70, 64), 'SAME', jax.nn.relu),
    (5, 1, (67, 40), 'SAME', jax.nn.hard_swish),
    # No padding: the last row and column of a 10x10 map at stride 2 are read by no output, and
    # their input gradient is zero.
    (3, 2, (10, 10), 'VALID', jax.nn.relu6), (5, 1, (9, 9), 'VALID', jax.nn.hard_swish),
    (3, 2, (70, 65), 'VALID', jax.nn.relu)])
def test_the_backward_call_matches_xla_and_the_three_calls_it_replaces(size, strides, spatial,
                                                                        padding, activation):
  """One call's filter gradient, input gradient and BatchNorm sums against XLA's convolution VJP
  and BatchNorm formula, and against the filter gradient alone, the input-gradient kernel and the
  BatchNorm's backward-sums kernel."""
  rng = np.random.default_rng(7)
  channels = 16
  x = jnp.asarray(rng.normal(0.5, 2.0, size=(3, *spatial, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(size, size, channels)), jnp.float32)
  a = jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32)
  b = jnp.asarray(rng.normal(0.0, 0.5, channels), jnp.float32)
  mean = jnp.mean(x, axis=(0, 1, 2))
  s = (strides, strides)
  pads = depthwise.explicit_padding(spatial, (size, size), s, padding)
  activated = activation(x * a + b)
  y, conv_vjp = jax.vjp(lambda inputs, w: depthwise.depthwise_conv_xla(
      inputs, w[:, :, None], s, pads), activated, kernel)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  want_activated, want_filter = conv_vjp(g)
  gated = jax.vjp(activation, x * a + b)[1](want_activated)[0]
  want_sums = (jnp.sum(gated, axis=(0, 1, 2)), jnp.sum(gated * (x - mean), axis=(0, 1, 2)))

  d_filter, d_activated, sum_g, sum_gx = depthwise.activated_backward_kernel_call(
      x, g, kernel, a, b, mean, strides=s, pads=pads, input_activation=activation)
  scaled = lambda want: 1e-4 * float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(d_activated, want_activated, rtol=1e-4, atol=scaled(want_activated))
  np.testing.assert_allclose(d_filter, want_filter, rtol=1e-4, atol=scaled(want_filter))
  for have, want in zip((sum_g, sum_gx), want_sums):
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=scaled(want))
  if padding == 'VALID':  # The rows and columns past the last window have no gradient.
    unread_rows = spatial[0] - ((y.shape[1] - 1) * strides + size)
    unread_columns = spatial[1] - ((y.shape[2] - 1) * strides + size)
    assert not np.any(np.asarray(d_activated)[:, spatial[0] - unread_rows:])
    assert not np.any(np.asarray(d_activated)[:, :, spatial[1] - unread_columns:])

  np.testing.assert_array_equal(d_filter, depthwise.activated_backward_kernel_call(
      x, g, kernel, a, b, mean, strides=s, pads=pads, input_activation=activation,
      input_grad=False))
  np.testing.assert_array_equal(
      d_activated, depthwise.input_grad_kernel_call(g, kernel, x.shape, strides=s, pads=pads))
  three_calls = batch_norm.kernel_backward_sums(x, d_activated, a, b, mean,
                                                batch_norm.KERNEL_ACTIVATIONS[activation])
  for have, want in zip((sum_g, sum_gx), three_calls):
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=scaled(want))


@needs_kernels
def test_fusion_refuses_what_the_kernels_do_not_compute():
  x = jnp.zeros((2, 8, 8, 16))
  kernel3, kernel7 = jnp.zeros((3, 3, 1, 16)), jnp.zeros((7, 7, 1, 16))
  assert norm_depthwise.DepthwiseAfter(kernel3, (1, 1), 'SAME', 'auto').fuses(x, jax.nn.relu6)
  assert not norm_depthwise.DepthwiseAfter(kernel7, (1, 1), 'SAME', 'auto').fuses(x, jax.nn.relu6)
  assert not norm_depthwise.DepthwiseAfter(kernel3, (1, 1), 'SAME', 'shifted').fuses(
      x, jax.nn.relu6)
  assert not norm_depthwise.DepthwiseAfter(kernel3, (1, 1), 'SAME', 'auto').fuses(
      x.astype(jnp.bfloat16), jax.nn.relu6)
  assert not norm_depthwise.DepthwiseAfter(kernel3, (1, 1), 'SAME', 'auto').fuses(x, nn.gelu)
  x12 = jnp.zeros((2, 8, 8, 12))  # Not a multiple of 8 channels.
  assert not norm_depthwise.DepthwiseAfter(jnp.zeros((3, 3, 1, 12)), (1, 1), 'SAME', 'auto').fuses(
      x12, jax.nn.relu6)


class Block(nn.Module):
  """One inverted residual block built with an op set, in training mode."""
  ops: str
  activation: str
  kernel_size: int
  strides: int

  @nn.compact
  def __call__(self, x):
    ops = op_sets.op_set(self.ops, train=True)
    return blocks.InvertedResidual(
        features=16, kernel_size=self.kernel_size, strides=self.strides,
        activation=self.activation, conv=ops.conv, norm=ops.norm, expanded_features=48,
        se_features=8 if self.activation == 'hard_swish' else 0,
        residual=self.strides == 1, name='block')(x)


@needs_kernels
@pytest.mark.parametrize('activation,kernel_size,strides', [
    ('relu6', 3, 1), ('relu6', 3, 2), ('hard_swish', 5, 1)])
def test_block_trains_as_with_the_plain_flax_layers(activation, kernel_size, strides):
  x = jax.random.normal(jax.random.key(1), (4, 12, 12, 16))
  plain, fast = (Block(ops, activation, kernel_size, strides) for ops in ('plain', 'fast'))
  variables = plain.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, variables, fast.init(jax.random.key(0), x))
  weights = jax.random.normal(jax.random.key(2), plain.apply(variables, x,
                                                             mutable=['batch_stats'])[0].shape)

  def loss(model, params, images):
    y, updates = model.apply({**variables, 'params': params}, images, mutable=['batch_stats'])
    return jnp.sum(y * weights), updates['batch_stats']

  grads = {}
  for name, model in (('plain', plain), ('fast', fast)):
    step = jax.jit(jax.grad(lambda p, i, m=model: loss(m, p, i), argnums=(0, 1), has_aux=True))
    grads[name] = step(variables['params'], x)
    if name == 'fast':  # The expansion's BatchNorm went into the depthwise kernel.
      assert 'mobilenet_depthwise_activated_backward' in step.lower(
          variables['params'], x).as_text()
  (fast_grads, fast_stats), (plain_grads, plain_stats) = grads['fast'], grads['plain']
  errors = jax.tree.map(relative_l2, fast_grads, plain_grads)
  # 1e-3: a BatchNorm scale's gradient sums terms of both signs; the unfused 'fast' layers differ
  # from plain Flax's by ~1.5e-4 there too.
  assert max(jax.tree.leaves(errors)) < 1e-3, errors
  jax.tree.map(lambda h, w: np.testing.assert_allclose(h, w, rtol=1e-4, atol=1e-5), fast_stats,
               plain_stats)


@needs_kernels
@pytest.mark.parametrize('name,alpha,fused_layers', [
    ('mobilenet_v1', 0.25, 13),  # The stem's norm and each block's last, into the next block.
    ('mobilenet_v2', 0.35, 17),  # 16 expansions, and the stem's norm into block_01.
    ('mobilenet_v3_small', 0.5, 11),  # 10 expansions, and the stem's into block_01.
    ('mobilenet_v3_large', 1.0, 14),  # 14 expansions; block_01 adds the stem's output back.
])
def test_norms_handed_across_blocks_train_as_the_layers_in_their_own_blocks(name, alpha,
                                                                           fused_layers):
  """A block's last norm, handed to the next block's depthwise layer (blocks.py), and an
  expansion's, fused: the same gradients, the same updated statistics under the same names, as
  with config.model.fused_training=false (the A/B switch), which runs the two layers."""
  plan = architectures.plan(name, width_multiplier=alpha, form='cifar')
  # 8 images of 32x32, not fewer or smaller: V2's last BatchNorms then normalize over 32 values,
  # not 4, and the gradients stop being chaotic (with 4 images of 16x16, scaling the images by
  # 1 + 1e-7 moved plain Flax's own gradients by 39%; here by 2e-5).
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  results, hlo = {}, {}
  for fused_training in (True, False):
    model = MobileNet(plan=plan, num_classes=5, fused_training=fused_training)
    variables = model.init(jax.random.key(0), images)

    def loss(params, model=model, variables=variables):
      logits, updates = model.apply({**variables, 'params': params}, images, train=True,
                                    mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits)), updates['batch_stats']

    step = jax.jit(jax.grad(loss, has_aux=True))
    results[fused_training] = step(variables['params'])
    hlo[fused_training] = step.lower(variables['params']).as_text()
  assert hlo[True].count('mobilenet_depthwise_activated_backward') == fused_layers
  assert 'mobilenet_depthwise_activated_backward' not in hlo[False]
  assert jax.tree.structure(results[True]) == jax.tree.structure(results[False])
  for have, want in zip(results[True], results[False]):  # Gradients, then statistics.
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (have, want)]
    assert relative_l2(*flat) < 1e-4  # Float rounding through up to 17 batch statistics.
    # Leaf by leaf against the largest magnitude: some gradients are zero but for rounding
    # (a BatchNorm's bias before another BatchNorm).
    tolerance = 1e-4 * float(np.max(np.abs(flat[1])))
    jax.tree.map(lambda h, w, t=tolerance: np.testing.assert_allclose(h, w, rtol=1e-3, atol=t),
                 have, want)


def test_a_block_with_an_expansion_or_residual_refuses_a_handed_norm():
  ops = op_sets.op_set('plain', train=True)
  norm = ops.norm(activation=nn.relu)
  for expanded, residual in ((48, False), (0, True)):
    block = blocks.InvertedResidual(features=16, kernel_size=3, strides=1, activation='relu',
                                    conv=ops.conv, norm=ops.norm, expanded_features=expanded,
                                    residual=residual)
    with pytest.raises(ValueError, match='input_norm'):
      block.init(jax.random.key(0), jnp.zeros((1, 8, 8, 16)), input_norm=norm)
