"""Every architecture's counts against keras.applications (exactly) and the papers (within rounding)."""
import numpy as np
import pytest

from mobilenet.models import architectures, counting


def totals(name, alpha=1.0, resolution=224, **kwargs) -> counting.Totals:
  return counting.totals(counting.imagenet_specs(name, width_multiplier=alpha,
                                                 resolution=resolution, **kwargs))


def keras_counts(model) -> tuple[int, int]:
  """(trainable, non-trainable) entries: Keras' own split of parameters and BatchNorm statistics."""
  return (sum(int(np.prod(w.shape)) for w in model.trainable_weights),
          sum(int(np.prod(w.shape)) for w in model.non_trainable_weights))


@pytest.fixture(scope='module')
def keras():
  import keras as keras_module  # Imports TensorFlow: only for the tests that compare with Keras.
  return keras_module


@pytest.mark.slow
@pytest.mark.parametrize('alpha', [0.35, 0.5, 0.75, 1.0, 1.3, 1.4])
def test_mobilenet_v2_counts_equal_keras(keras, alpha):
  model = keras.applications.MobileNetV2(alpha=alpha, weights=None)
  total = totals('mobilenet_v2', alpha)
  assert (total.params, total.batch_stats) == keras_counts(model)


@pytest.mark.slow
@pytest.mark.parametrize('size', ['large', 'small'])
@pytest.mark.parametrize('minimalistic', [False, True])
@pytest.mark.parametrize('alpha', [0.75, 1.0])
def test_mobilenet_v3_counts_equal_keras(keras, size, minimalistic, alpha):
  build = {'large': keras.applications.MobileNetV3Large,
           'small': keras.applications.MobileNetV3Small}[size]
  model = build(alpha=alpha, minimalistic=minimalistic, weights=None, include_preprocessing=False)
  name = f'mobilenet_v3_{size}' + ('_minimalistic' if minimalistic else '')
  total = totals(name, alpha)
  assert (total.params, total.batch_stats) == keras_counts(model)


@pytest.mark.slow
@pytest.mark.parametrize('alpha', [1.0, 0.5])
def test_mobilenet_v1_counts_equal_keras(keras, alpha):
  model = keras.applications.MobileNet(alpha=alpha, weights=None)
  total = totals('mobilenet_v1', alpha)
  assert (total.params, total.batch_stats) == keras_counts(model)


# TF-slim's MobileNetV2 table (the reference release): alpha, mult-adds (M), parameters (M).
# The paper's Table 4 prints 300 M / 3.4 M at 1.0 and 585 M / 6.9 M at 1.4.
@pytest.mark.parametrize('alpha, mult_adds_millions, params_millions', [
    (1.4, 582, 6.06), (1.3, 509, 5.34), (1.0, 300, 3.47), (0.75, 209, 2.61), (0.5, 97, 1.95),
    (0.35, 59, 1.66)])
def test_mobilenet_v2_mult_adds_match_reference_table(alpha, mult_adds_millions, params_millions):
  total = totals('mobilenet_v2', alpha)
  assert abs(total.mult_adds / 1e6 - mult_adds_millions) < 1
  assert abs(total.params / 1e6 - params_millions) < 0.05


# The V3 paper's Table 3: mult-adds (M), parameters (M). Large 1.0 is 217 M in the
# reference release (its own table says 217); the paper prints 219.
@pytest.mark.parametrize('name, alpha, mult_adds_millions, params_millions', [
    ('mobilenet_v3_large', 1.0, 217, 5.4), ('mobilenet_v3_large', 0.75, 155, 4.0),
    ('mobilenet_v3_small', 1.0, 56, 2.5), ('mobilenet_v3_small', 0.75, 44, 2.0),
    ('mobilenet_v3_large_minimalistic', 1.0, 209, 3.9)])
def test_mobilenet_v3_mult_adds_match_papers(name, alpha, mult_adds_millions, params_millions):
  total = totals(name, alpha)
  assert abs(total.mult_adds / 1e6 - mult_adds_millions) < 1
  assert abs(total.params / 1e6 - params_millions) < 0.1


def test_make_divisible_rounds_as_the_reference():
  assert [architectures.make_divisible(v) for v in (4, 12, 16 * 0.35, 20, 27.9, 1280 * 1.4)] == [
      8, 16, 8, 24, 32, 1792]


def test_v3_stem_and_pre_logits_stay_unscaled_below_alpha_one():
  plan = architectures.plan('mobilenet_v3_large', width_multiplier=0.75)
  assert plan.stages[0].out_channels == 16 and plan.pre_logits_channels == 1280
  wide = architectures.plan('mobilenet_v3_large', width_multiplier=1.25)
  assert wide.pre_logits_channels == 1600


def test_v2_last_conv_stays_1280_below_alpha_one():
  assert architectures.plan('mobilenet_v2', width_multiplier=0.5).stages[-1].out_channels == 1280
  assert architectures.plan('mobilenet_v2', width_multiplier=1.4).stages[-1].out_channels == 1792


def test_inverted_residual_blocks_keep_the_input_where_shapes_allow():
  plan = architectures.plan('mobilenet_v2')
  residual = [stage.residual for stage in plan.stages if stage.kind == 'inverted_residual']
  # Table 2: the repeats after the first of each row (n - 1 per row) are residual.
  assert sum(residual) == 10 and not residual[0]


def test_conv_mobilenet_is_v1_only():
  with pytest.raises(ValueError, match='mobilenet_v1 only'):
    architectures.plan('mobilenet_v2', conv_type='standard')
