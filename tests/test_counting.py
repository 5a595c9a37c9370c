"""The analytic counts against the V1 paper, TF-slim, Flax's parameters and XLA's cost analysis."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mobilenet.models import architectures, counting
from mobilenet.models.counting import LayerSpec
from mobilenet.models.mobilenet import MobileNet


def imagenet_totals(**kwargs) -> counting.Totals:
  return counting.totals(counting.imagenet_specs(**kwargs))


def test_design_notes_example():
  example = counting.design_notes_example()
  assert (example['N_std'], example['N_dw'], example['N_pw'], example['N_sep']) == (108, 27, 12, 39)


@pytest.mark.parametrize('alpha, mult_adds_millions, params_millions', [
    (1.0, 569, 4.2), (0.75, 325, 2.6), (0.5, 149, 1.3), (0.25, 41, 0.5)])
def test_table6_width_multiplier(alpha, mult_adds_millions, params_millions):
  total = imagenet_totals(width_multiplier=alpha)
  assert abs(total.mult_adds / 1e6 - mult_adds_millions) < 1
  assert abs(total.params / 1e6 - params_millions) < 0.1


@pytest.mark.parametrize('resolution, mult_adds_millions', [
    (224, 569), (192, 418), (160, 290), (128, 186)])
def test_table7_resolution(resolution, mult_adds_millions):
  assert abs(imagenet_totals(resolution=resolution).mult_adds / 1e6 - mult_adds_millions) < 1


def test_table4_conv_mobilenet():
  specs = counting.imagenet_specs(conv_type='standard')
  body = counting.totals(specs[:-1])  # Table 4's 4866 leaves the classifier out.
  assert abs(body.mult_adds / 1e6 - 4866) < 1
  assert abs(counting.totals(specs).params / 1e6 - 29.3) < 0.1


def test_table3_one_layer_at_14x14x512():
  full = LayerSpec('full', 'standard', 3, 1, 512, 512, 14, 14)
  depthwise = LayerSpec('dw', 'depthwise', 3, 1, 512, 512, 14, 14)
  pointwise = LayerSpec('pw', 'pointwise', 1, 1, 512, 512, 14, 14)
  assert round(full.mult_adds / 1e6) == 462 and round(full.weights / 1e6, 2) == 2.36
  assert round((depthwise.mult_adds + pointwise.mult_adds) / 1e6, 1) == 52.3
  assert round((depthwise.weights + pointwise.weights) / 1e6, 2) == 0.27


@pytest.mark.parametrize('alpha, resolution, weights, mult_adds', [
    (1.0, 224, 3_185_088, 567_716_352), (0.75, 128, 1_800_144, 106_002_432)])
def test_tf_slim_body_is_exact(alpha, resolution, weights, mult_adds):
  body = counting.totals(counting.imagenet_specs(width_multiplier=alpha,
                                                resolution=resolution)[:-1])
  assert (body.weights, body.mult_adds) == (weights, mult_adds)


def test_second_to_last_depthwise_keeps_7x7():
  specs = {spec.name: spec for spec in counting.imagenet_specs()}
  assert specs['block_13/depthwise'].in_size == specs['block_13/depthwise'].out_size == 7


@pytest.mark.parametrize('name, alpha, resolution, form, num_classes, input_channels', [
    ('mobilenet_v1', 1.0, 224, 'imagenet', 1000, 3),
    ('mobilenet_v1', 0.25, 192, 'imagenet', 10, 3),
    ('mobilenet_v1', 0.75, 28, 'cifar', 10, 1),
    ('mobilenet_v2', 0.35, 32, 'cifar', 100, 3),
    ('mobilenet_v2', 1.4, 64, 'imagenet', 10, 3),
    ('mobilenet_v3_large', 1.0, 64, 'imagenet', 10, 3),
    ('mobilenet_v3_small', 0.75, 28, 'cifar', 10, 1),
    ('mobilenet_v3_small_minimalistic', 1.25, 32, 'cifar', 10, 3),
])
def test_counts_equal_initialized_flax_parameters(name, alpha, resolution, form, num_classes,
                                                  input_channels):
  plan = architectures.plan(name, width_multiplier=alpha, form=form,
                            input_channels=input_channels)
  specs = counting.layer_specs(plan, resolution, num_classes)
  model = MobileNet(plan=plan, num_classes=num_classes)
  flax_counts = counting.initialized_counts(model, (1, resolution, resolution, input_channels))
  for spec in specs:
    assert flax_counts['params'][spec.name] == spec.weights + spec.biases, spec.name
  total = counting.totals(specs)
  assert sum(flax_counts['params'].values()) == total.params
  assert sum(flax_counts['batch_stats'].values()) == total.batch_stats


def test_conv_mobilenet_counts_equal_initialized_flax_parameters():
  plan = architectures.plan(width_multiplier=0.5, form='cifar', conv_type='standard')
  flax_counts = counting.initialized_counts(MobileNet(plan=plan, num_classes=10), (1, 32, 32, 3))
  assert sum(flax_counts['params'].values()) == counting.totals(
      counting.layer_specs(plan, 32, 10)).params


def single_layer(spec: LayerSpec) -> nn.Module:
  """The Flax layer a spec describes, alone, as plain nn.Conv / nn.Dense.

  'VALID' padding on an input already grown by the 'SAME' padding: XLA's cost
  analysis leaves out some taps that fall on padding, the paper's count does not.
  """
  if spec.kind == 'dense':
    return nn.Dense(spec.out_channels)
  groups = spec.in_channels if spec.kind == 'depthwise' else 1
  return nn.Conv(spec.out_channels, (spec.kernel_size,) * 2, spec.stride, padding='VALID',
                 feature_group_count=groups, use_bias=False)


@pytest.mark.parametrize('name, kwargs', [
    ('mobilenet_v1', dict(width_multiplier=0.25, form='imagenet')),
    ('mobilenet_v1', dict(width_multiplier=0.5, form='cifar', conv_type='standard')),
    pytest.param('mobilenet_v3_small', dict(width_multiplier=0.5, form='imagenet'),
                 marks=pytest.mark.slow),
])
def test_counts_equal_xla_cost_analysis(name, kwargs):
  """Every layer's mult-adds equal half of XLA's flops for that layer alone."""
  resolution = 64 if kwargs['form'] == 'imagenet' else 32
  plan = architectures.plan(name, **kwargs)
  for spec in counting.layer_specs(plan, resolution, 10):
    layer = single_layer(spec)
    padded_size = (spec.out_size - 1) * spec.stride + spec.kernel_size
    shape = ((1, spec.in_channels) if spec.kind == 'dense' else
             (1, padded_size, padded_size, spec.in_channels))
    inputs = jnp.zeros(shape)
    variables = jax.eval_shape(layer.init, jax.random.key(0), inputs)
    cost = jax.jit(layer.apply).lower(variables, inputs).compile().cost_analysis()
    if spec.kind == 'dense':  # XLA counts K multiplies and K - 1 adds per output, bias aside.
      assert abs(cost['flops'] / 2 - spec.mult_adds) <= spec.out_channels, spec.name
    else:
      assert cost['flops'] / 2 == spec.mult_adds, spec.name
