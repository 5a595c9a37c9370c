"""The family's forward passes, forms, dtypes, parameter trees and blocks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.models import architectures, blocks
from mobilenet.models.mobilenet import MobileNet, create_model
from mobilenet.ops import op_sets
from mobilenet.training import config_base


def net(name='mobilenet_v1', *, alpha=0.25, form='cifar', num_classes=10, **kwargs):
  plan_kwargs = {key: kwargs.pop(key) for key in ('activation', 'conv_type') if key in kwargs}
  plan = architectures.plan(name, width_multiplier=alpha, form=form, **plan_kwargs)
  return MobileNet(plan=plan, num_classes=num_classes, **kwargs)


def forward(model, resolution, channels=3, batch=2, train=False):
  images = jax.random.normal(jax.random.key(1), (batch, resolution, resolution, channels))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  if not train:
    return jax.jit(model.apply)(variables, images)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                               rngs={'dropout': jax.random.key(2)}))(variables, images)
  return logits


@pytest.mark.parametrize('dtype', [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize('alpha', [pytest.param(1.0, marks=pytest.mark.slow), 0.25])
@pytest.mark.parametrize('form, resolution', [pytest.param('imagenet', 224, marks=pytest.mark.slow),
                                              ('cifar', 32)])
def test_v1_forward_every_form_alpha_and_dtype(form, resolution, alpha, dtype):
  logits = forward(net(alpha=alpha, form=form, dtype=dtype), resolution, batch=1)
  assert logits.shape == (1, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


@pytest.mark.slow
@pytest.mark.parametrize('name', architectures.NAMES[1:])
@pytest.mark.parametrize('form, resolution', [('imagenet', 64), ('cifar', 28)])
def test_v2_v3_forward_and_train_mode(name, form, resolution):
  model = net(name, alpha=0.5, form=form, dropout_rate=0.2, dtype=jnp.bfloat16)
  for train in (False, True):
    logits = forward(model, resolution, channels=1, train=train)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize('resolution', [160, 28, 33])
def test_any_resolution(resolution):
  model = net(num_classes=7, form='cifar' if resolution < 64 else 'imagenet')
  assert forward(model, resolution, channels=1).shape == (2, 7)


def test_train_mode_updates_batch_stats_and_dropout_is_used():
  model = net(num_classes=3, dropout_rate=0.5)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  apply = jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                rngs={'dropout': key}))
  first, updates = apply(variables, images, jax.random.key(2))
  second, _ = apply(variables, images, jax.random.key(3))
  before = jax.tree.leaves(variables['batch_stats'])
  after = jax.tree.leaves(updates['batch_stats'])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  assert not np.allclose(first, second)  # Different dropout masks.


def test_v1_parameter_tree_is_unchanged():
  """Run folders of MobileNetV1 from before the family keep resuming: same names and shapes."""
  variables = jax.eval_shape(net(alpha=1.0).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = variables['params']
  assert set(params) == {'stem', 'head', *(f'block_{i:02d}' for i in range(1, 14))}
  assert set(params['stem']) == {'conv', 'bn'} and params['stem']['conv']['kernel'].shape == (3, 3, 3, 32)
  assert set(params['block_01']) == {'depthwise', 'depthwise_bn', 'pointwise', 'pointwise_bn'}
  assert params['block_13']['depthwise']['kernel'].shape == (3, 3, 1, 1024)
  assert params['block_13']['pointwise']['kernel'].shape == (1, 1, 1024, 1024)
  assert set(variables['batch_stats']['block_13']['pointwise_bn']) == {'mean', 'var'}


def test_standard_conv_variant_has_no_depthwise_layers():
  model = net(conv_type='standard')
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert 'depthwise' not in variables['params']['block_01']
  assert variables['params']['block_01']['conv']['kernel'].shape == (3, 3, 8, 16)


def test_v3_blocks_hold_se_expansion_and_pre_logits():
  variables = jax.eval_shape(net('mobilenet_v3_small', alpha=1.0).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))['params']
  assert set(variables['block_01']) == {'depthwise', 'depthwise_bn', 'se', 'project', 'project_bn'}
  assert variables['block_04']['depthwise']['kernel'].shape == (5, 5, 1, 96)
  assert variables['block_04']['se']['squeeze']['kernel'].shape == (96, 24)
  assert variables['pre_logits']['kernel'].shape == (576, 1024)


def test_relu6_clips_activations():
  model = net(activation='relu6')
  images = 100 * jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), images)
  _, state = model.apply(variables, images, capture_intermediates=True)
  stem = state['intermediates']['stem']['__call__'][0]
  assert float(stem.max()) <= 6.0 and float(stem.max()) > 0


def test_inverted_residual_adds_its_input_only_when_shapes_match():
  ops = op_sets.op_set('plain', train=False)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  block = blocks.InvertedResidual(16, 3, 1, 'relu6', ops.conv, ops.norm, expanded_features=32,
                                  residual=True)
  variables = block.init(jax.random.key(1), x)
  without = block.clone(residual=False)
  np.testing.assert_allclose(block.apply(variables, x), without.apply(variables, x) + x, rtol=1e-6)


def test_squeeze_excite_scales_each_channel_by_a_gate_in_0_1():
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 16)) + 2.0
  se = blocks.SqueezeExcite(8)
  variables = se.init(jax.random.key(1), x)
  gate = se.apply(variables, x) / x
  assert np.all((gate >= 0) & (gate <= 1))
  np.testing.assert_allclose(gate, gate[:, :1, :1, :] * jnp.ones_like(gate), rtol=1e-5)


def test_depthwise_block_is_a_grouped_conv_per_channel():
  """The depthwise layer: feature_group_count = C, so channel c sees only input channel c."""
  ops = op_sets.op_set('plain', train=False)
  block = blocks.DepthwiseSeparable(4, 3, 2, 'relu', ops.conv, ops.norm)
  variables = block.init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))
  params = variables['params']
  assert params['depthwise']['kernel'].shape == (3, 3, 1, 3)  # 27 weights
  assert params['pointwise']['kernel'].shape == (1, 1, 3, 4)  # 12 weights
  depthwise = nn.Conv(3, (3, 3), 2, feature_group_count=3, use_bias=False)
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
  y = depthwise.apply({'params': params['depthwise']}, x)
  single = jax.lax.conv_general_dilated(x[..., 1:2], params['depthwise']['kernel'][..., 1:2],
                                        (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(y[..., 1:2], single, rtol=1e-5, atol=1e-5)


def test_create_model_reads_the_config():
  config = config_base.base_config()
  config.model.name = 'mobilenet_v3_large'
  config.model.width_multiplier = 0.75
  model = create_model(config.model)
  assert model.plan == architectures.plan('mobilenet_v3_large', width_multiplier=0.75,
                                          form='cifar')
  assert model.ops == 'fast'


@pytest.mark.parametrize('name', ['mobilenet_v1', 'mobilenet_v3_large'])
def test_initialization_compiled_for_compile_time_matches_the_optimized_program(name):
  """train_step.run_once: the same state to an ulp or two, and bitwise the same every time."""
  import functools  # pylint: disable=import-outside-toplevel
  from mobilenet.training import optim, train_step  # pylint: disable=import-outside-toplevel
  config = config_base.base_config()
  config.model.name, config.model.width_multiplier, config.model.resolution = name, 0.25, 16
  config.ema_decay = 0.99
  model = create_model(config.model)
  tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 10, 100))
  init = jax.jit(functools.partial(train_step.create_train_state, model, tx, config, (16, 16, 3)))
  quick, again, optimized = train_step.run_once(init), train_step.run_once(init), init()
  assert jax.tree.structure(quick) == jax.tree.structure(optimized)
  jax.tree.map(np.testing.assert_array_equal, quick, again)
  jax.tree.map(lambda q, o: np.testing.assert_allclose(q, o, rtol=1e-6, atol=1e-7), quick,
               optimized)
  # Not zeros or a broken random stream: the kernels differ from layer to layer.
  kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(quick.params)
             if 'kernel' in jax.tree_util.keystr(path)]
  assert len({float(jnp.std(k)) for k in kernels}) > len(kernels) // 2
