"""Flax building blocks of depthwise-separable networks.

A standard k x k convolution from M to N channels has k*k*M*N weights. The
depthwise-separable factorization replaces it with a depthwise k x k
convolution (one filter per input channel: k*k*M weights) followed by a
pointwise 1x1 convolution (M*N weights).
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from mobilenet import depthwise

# He initialization: every convolution here is followed by BatchNorm and a ReLU.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
# Inference-mode BatchNorm with the paper's epsilon; the model binds train mode itself.
default_batch_norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-3)


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
  (../shared/bench/FINDINGS.md). No bias: BatchNorm follows.
  """
  features: int
  dtype: Any = jnp.float32
  kernel_init: Callable = conv_kernel_init

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', self.kernel_init, (1, 1, inputs.shape[-1], self.features),
                        jnp.float32)
    return jnp.einsum('nhwc,cd->nhwd', inputs.astype(self.dtype), kernel[0, 0].astype(self.dtype))


class ConvBN(nn.Module):
  """A standard convolution (no bias) -> BatchNorm -> activation."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  activation: Callable = nn.relu
  batch_norm: Callable = default_batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), self.strides, padding='SAME',
                use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init, name='conv')(inputs)
    return self.activation(self.batch_norm(name='bn')(x))


class DepthwiseSeparable(nn.Module):
  """Depthwise -> BatchNorm -> activation -> pointwise -> BatchNorm -> activation.

  `batch_norm` is a partially applied `nn.BatchNorm` (train/eval mode,
  momentum, epsilon and dtype bound by the caller).
  """
  features: int
  strides: int = 1
  kernel_size: int = 3
  activation: Callable = nn.relu
  batch_norm: Callable = default_batch_norm
  depthwise_implementation: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    x = DepthwiseConv(self.kernel_size, self.strides, implementation=self.depthwise_implementation,
                      dtype=self.dtype, name='depthwise')(inputs)
    x = self.activation(self.batch_norm(name='depthwise_bn')(x))
    x = PointwiseConv(self.features, dtype=self.dtype, name='pointwise')(x)
    return self.activation(self.batch_norm(name='pointwise_bn')(x))

