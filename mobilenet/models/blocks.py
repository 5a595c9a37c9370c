"""The blocks of the MobileNet family, written with the convolution and BatchNorm modules they are given.

Each block takes `conv` and `norm` factories (ops/op_sets.py), as flax's
ResNet blocks do: `conv` has `nn.Conv`'s signature (no bias, 'SAME' padding),
`norm` is BatchNorm followed by an activation. `conv(...)(x, input_norm=norm)`
is `conv(...)(norm(x))`, a pair an op set may compute as one operation. A
depthwise convolution is `conv(C, (k, k), feature_group_count=C)`: one k x k
filter per input channel, k*k*C weights, where a standard convolution to N maps
has k*k*C*N. A pointwise convolution is `conv(N, (1, 1))`: C*N weights.

Across blocks, the same pairing: a block whose last BatchNorm feeds only the
next block's depthwise layer (the stem before V1's first block, each V1 block
before the next) may be called with `hand_off_norm=True` and return
`(x, norm)`, its output before that norm and the norm itself; the builder
passes them on as the next block's `input_norm`. The norm keeps its place
(and parameters) in the block that owns it.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
ACTIVATIONS: dict[str, Callable] = {
    'relu': nn.relu, 'relu6': jax.nn.relu6, 'hard_swish': jax.nn.hard_swish}


def finish(x: jnp.ndarray, norm: nn.Module, hand_off_norm: bool):
  """A block's end: `norm(x)`, or `(x, norm)` for the next block to apply (see the docstring)."""
  return (x, norm) if hand_off_norm else norm(x)


class ConvNormActivation(nn.Module):
  """A k x k convolution -> BatchNorm -> activation: the stem, Conv MobileNet's blocks, V2/V3's last layer."""
  features: int
  kernel_size: int
  strides: int
  activation: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jnp.ndarray, hand_off_norm: bool = False):
    x = self.conv(self.features, (self.kernel_size,) * 2, self.strides, name='conv')(x)
    return finish(x, self.norm(activation=ACTIVATIONS[self.activation], name='bn'), hand_off_norm)


class DepthwiseSeparable(nn.Module):
  """MobileNetV1's block: depthwise k x k -> BN -> activation -> pointwise 1x1 -> BN -> activation."""
  features: int
  kernel_size: int
  strides: int
  activation: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jnp.ndarray, input_norm: ModuleDef = None, hand_off_norm: bool = False):
    activation = ACTIVATIONS[self.activation]
    channels = x.shape[-1]
    x = self.conv(channels, (self.kernel_size,) * 2, self.strides, feature_group_count=channels,
                  name='depthwise')(x, input_norm=input_norm)
    x = self.norm(activation=activation, name='depthwise_bn')(x)
    x = self.conv(self.features, (1, 1), name='pointwise')(x)
    return finish(x, self.norm(activation=activation, name='pointwise_bn'), hand_off_norm)


class SqueezeExcite(nn.Module):
  """Channel attention (Hu et al. 2018) as MobileNetV3 uses it: x * hard_sigmoid(W2 relu(W1 mean(x)))."""
  bottleneck: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # The dense layers act on (N, C), not (N, 1, 1, C): TFLite's converter rejects the
    # rank-4 batch matmul the latter becomes (export/tflite.py).
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(nn.Dense(self.bottleneck, dtype=self.dtype, name='squeeze')(s))
    s = jax.nn.hard_sigmoid(nn.Dense(x.shape[-1], dtype=self.dtype, name='excite')(s))
    return x * s.astype(x.dtype)[:, None, None, :]


class InvertedResidual(nn.Module):
  """MobileNetV2/V3's block: expand 1x1 -> depthwise k x k -> [SE] -> linear 1x1 projection [+ input].

  The expansion (absent when `expanded_features` is 0) and the depthwise layer
  are followed by BatchNorm and the activation; the projection by BatchNorm
  alone (the linear bottleneck). The input is added back when `residual`.
  """
  features: int
  kernel_size: int
  strides: int
  activation: str
  conv: ModuleDef
  norm: ModuleDef
  expanded_features: int = 0
  se_features: int = 0
  residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, input_norm: ModuleDef = None) -> jnp.ndarray:
    """`input_norm`: the previous block's last norm, still to apply (only without an expansion
    and a residual, where the depthwise layer is the input's one reader)."""
    if input_norm is not None and (self.expanded_features or self.residual):
      raise ValueError('an input_norm needs a block that starts with its depthwise layer and '
                       'adds no residual')
    activation = ACTIVATIONS[self.activation]
    x = inputs
    if self.expanded_features:
      x = self.conv(self.expanded_features, (1, 1), name='expand')(x)
      # The expansion's BatchNorm + activation goes to the depthwise layer as its `input_norm`:
      # the same as applying it first, but an op set may compute the two as one operation.
      input_norm = self.norm(activation=activation, name='expand_bn')
    channels = x.shape[-1]
    x = self.conv(channels, (self.kernel_size,) * 2, self.strides, feature_group_count=channels,
                  name='depthwise')(x, input_norm=input_norm)
    x = self.norm(activation=activation, name='depthwise_bn')(x)
    if self.se_features:
      x = SqueezeExcite(self.se_features, dtype=self.dtype, name='se')(x)
    x = self.conv(self.features, (1, 1), name='project')(x)
    x = self.norm(activation=None, name='project_bn')(x)
    return x + inputs if self.residual else x
