"""MobileNetV1 forward passes, forms, dtypes and the layer modules' shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.models import blocks as layers
from mobilenet.models.mobilenet import MobileNetV1


def forward(model, resolution, channels=3, batch=2, train=False):
  images = jax.random.normal(jax.random.key(1), (batch, resolution, resolution, channels))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  if not train:
    return jax.jit(model.apply)(variables, images)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                               rngs={'dropout': jax.random.key(2)}))(variables, images)
  return logits


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('alpha', [1.0, 0.75, 0.5, 0.25])
@pytest.mark.parametrize('form, resolution', [('imagenet', 224), ('cifar', 32)])
def test_forward_every_alpha(form, resolution, alpha, dtype):
  model = MobileNetV1(num_classes=10, width_multiplier=alpha, form=form, dtype=dtype)
  logits = forward(model, resolution, batch=1)
  assert logits.shape == (1, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


@pytest.mark.parametrize('resolution', [160, 28, 33])
def test_any_resolution(resolution):
  model = MobileNetV1(num_classes=7, width_multiplier=0.25, form='cifar' if resolution < 64 else 'imagenet')
  assert forward(model, resolution, channels=1).shape == (2, 7)


def test_train_mode_updates_batch_stats_and_dropout_is_used():
  model = MobileNetV1(num_classes=3, width_multiplier=0.25, form='cifar', dropout_rate=0.5)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                rngs={'dropout': jax.random.key(2)}))(variables, images)
  before = jax.tree.leaves(variables['batch_stats'])
  after = jax.tree.leaves(updates['batch_stats'])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_standard_conv_variant_has_no_depthwise_layers():
  model = MobileNetV1(num_classes=10, width_multiplier=0.25, form='cifar', conv_type='standard')
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert 'depthwise' not in variables['params']['block_01']
  assert variables['params']['block_01']['conv']['kernel'].shape == (3, 3, 8, 16)


def test_relu6_clips_activations():
  model = MobileNetV1(num_classes=10, width_multiplier=0.25, form='cifar', activation='relu6')
  images = 100 * jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), images)
  _, state = model.apply(variables, images, capture_intermediates=True)
  stem = state['intermediates']['stem']['__call__'][0]
  assert float(stem.max()) <= 6.0 and float(stem.max()) > 0


@pytest.mark.parametrize('strides, multiplier, size', [(1, 1, 8), (2, 1, 9), (2, 2, 8)])
def test_depthwise_conv_is_grouped_conv(strides, multiplier, size):
  """Output channel c*m + j is filter j of input channel c, with no cross-channel mixing."""
  layer = layers.DepthwiseConv(3, strides, channel_multiplier=multiplier, implementation='xla')
  inputs = jax.random.normal(jax.random.key(0), (2, size, size, 4))
  variables = layer.init(jax.random.key(1), inputs)
  kernel = variables['params']['kernel']
  assert kernel.shape == (3, 3, 1, 4 * multiplier)
  outputs = layer.apply(variables, inputs)
  assert outputs.shape == (2, -(-size // strides), -(-size // strides), 4 * multiplier)
  # Channel 1 alone, through a plain single-channel convolution.
  single = jax.lax.conv_general_dilated(
      inputs[..., 1:2], kernel[..., multiplier:multiplier + 1], (strides, strides), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(outputs[..., multiplier:multiplier + 1], single, rtol=1e-5, atol=1e-5)


def test_pointwise_conv_is_1x1_conv():
  layer = layers.PointwiseConv(6)
  inputs = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  variables = layer.init(jax.random.key(1), inputs)
  kernel = variables['params']['kernel']
  assert kernel.shape == (1, 1, 3, 6)
  expected = jax.lax.conv_general_dilated(inputs, kernel, (1, 1), 'SAME',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(layer.apply(variables, inputs), expected, rtol=1e-5, atol=1e-5)


def test_separable_block_parameter_names_match_tf_slim_layout():
  block = layers.DepthwiseSeparable(4, strides=2)
  variables = block.init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))
  params = variables['params']
  assert params['depthwise']['kernel'].shape == (3, 3, 1, 3)  # 27 weights
  assert params['pointwise']['kernel'].shape == (1, 1, 3, 4)  # 12 weights
  assert set(params) == {'depthwise', 'depthwise_bn', 'pointwise', 'pointwise_bn'}
