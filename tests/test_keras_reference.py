"""Keras' MobileNets with random weights, converted: the same logits, on the plain and the fast ops."""
import numpy as np
import pytest

from mobilenet.models import architectures, fused_inference, keras_weights
from mobilenet.models.mobilenet import MobileNet
from mobilenet.ops.cpu import kernels as cpu_kernels

pytestmark = pytest.mark.slow  # The whole module is the full tier (see pyproject.toml).

RESOLUTION = 64  # Small, and even at every stride-2 layer (as 224 is): Keras' V1 pads like 'SAME'.


@pytest.fixture(scope='module')
def keras():
  import keras as keras_module  # Imports TensorFlow: only for the tests that compare with Keras.
  return keras_module


def build_keras(keras, name: str, alpha: float):
  shape = (RESOLUTION, RESOLUTION, 3)
  common = dict(input_shape=shape, alpha=alpha, weights=None, classifier_activation=None)
  if name == 'mobilenet_v1':
    return keras.applications.MobileNet(**common)
  if name == 'mobilenet_v2':
    return keras.applications.MobileNetV2(**common)
  build = (keras.applications.MobileNetV3Large if 'large' in name
           else keras.applications.MobileNetV3Small)
  return build(**common, minimalistic='minimalistic' in name, include_preprocessing=False)


def randomize_batch_norms(model, seed: int = 0) -> None:
  """Moves every BatchNorm's gamma, beta, mean and var off 1, 0, 0, 1, as training would."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if type(layer).__name__ == 'BatchNormalization':
      shape = layer.get_weights()[0].shape
      layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.2, shape),
                         rng.normal(0, 0.2, shape), rng.uniform(0.5, 1.5, shape)])


def relative_error(have, want) -> float:
  return float(np.max(np.abs(np.asarray(have) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize('name, alphas', [
    ('mobilenet_v1', (0.5, 1.0)), ('mobilenet_v2', (0.35, 1.0)),
    ('mobilenet_v3_large', (0.75, 1.0)), ('mobilenet_v3_small', (0.75, 1.0)),
    ('mobilenet_v3_small_minimalistic', (1.0,))])
def test_converted_keras_weights_give_keras_logits(keras, name, alphas):
  images = np.random.default_rng(1).normal(size=(2, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
  for alpha in alphas:
    keras_model = build_keras(keras, name, alpha)
    randomize_batch_norms(keras_model)
    want = np.asarray(keras_model(images, training=False))
    plan = architectures.plan(name, width_multiplier=alpha,
                              activation='relu6')  # Keras' V1 uses ReLU6; V2/V3 ignore it.
    variables = keras_weights.convert(keras_model, plan)
    ops = ('plain', 'fast') if cpu_kernels.available() else ('plain',)
    for op_set in ops:
      model = MobileNet(plan=plan, num_classes=1000, ops=op_set)
      have = model.apply(variables, images)
      assert relative_error(have, want) <= 1e-5, (name, alpha, op_set)
    fused = fused_inference.inference_fn(MobileNet(plan=plan, num_classes=1000))
    if fused is not None:  # MobileNetV1 on the CPU kernels.
      assert relative_error(fused(variables, images), want) <= 1e-5, (name, alpha, 'fused')


def test_a_keras_model_of_another_width_is_refused(keras):
  keras_model = build_keras(keras, 'mobilenet_v2', 0.5)
  with pytest.raises(keras_weights.WeightsMismatch, match='expects'):
    keras_weights.convert(keras_model, architectures.plan('mobilenet_v2', width_multiplier=0.75))
  with pytest.raises(keras_weights.WeightsMismatch, match='not the same architecture'):
    keras_weights.convert(keras_model, architectures.plan('mobilenet_v3_small'))
