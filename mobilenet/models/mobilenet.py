"""MobileNetV1 (Howard et al. 2017, arXiv 1704.04861) in flax.linen.

Exactly the published network in the 'imagenet' form: a 3x3 stem convolution
with stride 2, the 13 depthwise-separable blocks of Table 1, global average
pooling, dropout and a dense classifier; every convolution is followed by
BatchNorm (epsilon 1e-3) and the activation; 'SAME' padding as in TensorFlow,
so TF-slim / Keras weights map one to one. The 'cifar' form keeps the stem at
stride 1 for 32x32 or 28x28 inputs. The width multiplier alpha thins every
layer; the resolution multiplier rho is the input side (224, 192, 160, 128 ...).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mobilenet.models import architectures as architecture
from mobilenet.ops import batch_norm
from mobilenet.models import fused_inference as inference
from mobilenet.models.blocks import ConvBN, DepthwiseSeparable

ACTIVATIONS = {'relu': nn.relu, 'relu6': jax.nn.relu6}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class MobileNetV1(nn.Module):
  """MobileNetV1 classifier. Inputs: NHWC images; outputs: float32 logits."""
  num_classes: int = 1000
  width_multiplier: float = 1.0
  form: str = 'imagenet'
  conv_type: str = 'separable'  # 'standard': Table 4's "Conv MobileNet".
  activation: str = 'relu'
  dropout_rate: float = 0.0
  min_channels: int = 8
  batch_norm_momentum: float = 0.9
  batch_norm_epsilon: float = 1e-3
  depthwise_implementation: str = 'auto'
  dtype: Any = jnp.float32
  # Inference with the BatchNorms fused into the depthwise kernel where
  # inference.py supports it (CPU kernels): the same function, fewer passes.
  fused_inference: bool = True

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    # Layer by layer when initializing (to create the variables) or when a
    # caller captures the layers' intermediates.
    if (not train and self.fused_inference and not self.is_initializing()
        and not self.is_mutable_collection('intermediates') and inference.supported(self)):
      return inference.forward(self, self.variables, images)
    norm_activation = functools.partial(
        batch_norm.BatchNormActivation, use_running_average=not train,
        momentum=self.batch_norm_momentum, epsilon=self.batch_norm_epsilon,
        activation=ACTIVATIONS[self.activation], dtype=self.dtype)
    channels = functools.partial(architecture.scaled_channels,
                                 width_multiplier=self.width_multiplier,
                                 min_channels=self.min_channels)

    x = images.astype(self.dtype)
    x = ConvBN(channels(architecture.STEM_CHANNELS), architecture.KERNEL_SIZE,
               architecture.STEM_STRIDES[self.form], norm_activation, self.dtype,
               name='stem')(x)
    for index, (features, stride) in enumerate(
        zip(architecture.BLOCK_CHANNELS, architecture.BLOCK_STRIDES), start=1):
      name = architecture.block_name(index)
      if self.conv_type == 'separable':
        x = DepthwiseSeparable(channels(features), stride, architecture.KERNEL_SIZE,
                               norm_activation, self.depthwise_implementation, self.dtype,
                               name=name)(x)
      else:
        x = ConvBN(channels(features), architecture.KERNEL_SIZE, stride, norm_activation,
                   self.dtype, name=name)(x)

    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def create_model(model_config: ml_collections.ConfigDict) -> MobileNetV1:
  """Builds the model that `config.model` describes."""
  return MobileNetV1(
      num_classes=model_config.num_classes,
      width_multiplier=model_config.width_multiplier,
      form=model_config.form,
      conv_type=model_config.conv_type,
      activation=model_config.activation,
      dropout_rate=model_config.dropout_rate,
      min_channels=model_config.min_channels,
      batch_norm_momentum=model_config.batch_norm_momentum,
      batch_norm_epsilon=model_config.batch_norm_epsilon,
      depthwise_implementation=model_config.depthwise_implementation,
      dtype=DTYPES[model_config.dtype],
      fused_inference=model_config.fused_inference)
