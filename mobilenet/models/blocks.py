"""Flax building blocks of depthwise-separable networks.

A standard k x k convolution from M to N channels has k*k*M*N weights. The
depthwise-separable factorization replaces it with a depthwise k x k
convolution (one filter per input channel: k*k*M weights) followed by a
pointwise 1x1 convolution (M*N weights).
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from mobilenet.ops import batch_norm
from mobilenet.ops import convolution
from mobilenet.ops import depthwise
from mobilenet.ops import pointwise

# He initialization: every convolution here is followed by BatchNorm and a ReLU.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
# Inference-mode BatchNorm + ReLU with the paper's epsilon; the model binds train mode,
# momentum, activation and dtype itself.
default_norm_activation = batch_norm.BatchNormActivation


class DepthwiseConv(nn.Module):
  """k x k convolution applied to each input channel on its own.

  The kernel has shape (k, k, 1, C * channel_multiplier), the layout of XLA's
  grouped convolution with `feature_group_count` = C, so output channel
  c * channel_multiplier + j is filter j of input channel c. No bias: BatchNorm
  follows. `implementation` selects the kernel (see depthwise.py); all compute
  the same function.
  """
  kernel_size: int = 3
  strides: int = 1
  channel_multiplier: int = 1
  padding: str = 'SAME'
  implementation: str = 'auto'
  dtype: Any = jnp.float32
  kernel_init: Callable = conv_kernel_init

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    channels = inputs.shape[-1]
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel_size, self.kernel_size, 1, channels * self.channel_multiplier),
                        jnp.float32)
    return depthwise.depthwise_conv(
        inputs.astype(self.dtype), kernel.astype(self.dtype),
        strides=(self.strides, self.strides), padding=self.padding,
        implementation=self.implementation)


class PointwiseConv(nn.Module):
  """1x1 convolution: a matrix product over the channel axis, kernel (1, 1, C, N).

  Written as a dot rather than `nn.Conv(kernel_size=1)`: XLA on CPU runs the
  1x1 convolution's weight gradient several times slower than the same dot
  (../shared/bench/FINDINGS.md). `implementation` selects how the product's
  filter gradient is computed (see pointwise.py). No bias: BatchNorm follows.
  """
  features: int
  dtype: Any = jnp.float32
  kernel_init: Callable = conv_kernel_init
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', self.kernel_init, (1, 1, inputs.shape[-1], self.features),
                        jnp.float32)
    return pointwise.pointwise_conv(inputs.astype(self.dtype), kernel[0, 0].astype(self.dtype),
                                    implementation=self.implementation)


class StandardConv(nn.Module):
  """A k x k 'SAME' convolution without bias, kernel (k, k, C, N) as nn.Conv's.

  `implementation` selects the kernel ('xla', 'patches', 'cpu_kernel' or
  'auto'; see convolution.py); all compute the same function.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  implementation: str = 'auto'
  dtype: Any = jnp.float32
  kernel_init: Callable = conv_kernel_init

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel_size, self.kernel_size, inputs.shape[-1], self.features),
                        jnp.float32)
    return convolution.conv(inputs.astype(self.dtype), kernel.astype(self.dtype),
                            strides=self.strides, implementation=self.implementation)


class ConvBN(nn.Module):
  """A standard convolution (no bias) -> BatchNorm -> activation.

  `norm_activation` builds the BatchNorm + activation module (by default
  batch_norm.BatchNormActivation in inference mode with a ReLU).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  norm_activation: Callable[..., nn.Module] = default_norm_activation
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    x = StandardConv(self.features, self.kernel_size, self.strides, dtype=self.dtype,
                     name='conv')(inputs)
    return self.norm_activation(name='bn')(x)


class DepthwiseSeparable(nn.Module):
  """Depthwise -> BatchNorm -> activation -> pointwise -> BatchNorm -> activation.

  `norm_activation` builds each BatchNorm + activation module (a partially
  applied batch_norm.BatchNormActivation: train/eval mode, momentum, epsilon,
  activation and dtype bound by the caller).
  """
  features: int
  strides: int = 1
  kernel_size: int = 3
  norm_activation: Callable[..., nn.Module] = default_norm_activation
  depthwise_implementation: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    x = DepthwiseConv(self.kernel_size, self.strides, implementation=self.depthwise_implementation,
                      dtype=self.dtype, name='depthwise')(inputs)
    x = self.norm_activation(name='depthwise_bn')(x)
    x = PointwiseConv(self.features, dtype=self.dtype, name='pointwise')(x)
    return self.norm_activation(name='pointwise_bn')(x)

