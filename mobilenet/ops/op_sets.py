"""The operations a model is built with: the one switch between plain Flax and the fast kernels.

A model's blocks (models/blocks.py) are written with two module factories, as
flax's ResNet example passes `conv` and `norm`:

- `conv(features, kernel_size, strides, feature_group_count=...)`: a
  convolution without bias and 'SAME' padding, with `nn.Conv`'s signature and
  its `kernel` parameter of shape (kh, kw, in / groups, features). A depthwise
  layer is `feature_group_count` = input channels, a pointwise one a 1x1.
  Called as `conv(...)(x, input_norm=norm)` it convolves norm(x); the 'fast'
  depthwise layer then lets the norm compute both layers as one operation in
  training (ops/norm_depthwise.py; off with `fused_training=False`).
- `norm(activation=..., name=...)`: BatchNorm followed by the activation (None:
  none), with `nn.BatchNorm`'s `scale`, `bias`, `mean` and `var`.

`op_set(name)` returns the pair:

- 'plain': `nn.Conv` and `nn.BatchNorm` themselves (`PlainConv` only adds
  `input_norm`). The reference: what the network means, on every backend.
- 'fast': `Conv` and `batch_norm.BatchNormActivation` below. The same
  parameters (same shapes, names and initializers, so the same tree from the
  same seed) and the same function, computed per layer kind by the
  implementation ops/select.py measured fastest on the backend: on the CPU the
  C++ kernels for depthwise, pointwise filter gradients, the dense stem and
  BatchNorm + ReLU/ReLU6/hard-swish; on GPU and TPU XLA's convolutions and a BatchNorm with
  a hand-written VJP. tests/test_op_sets.py checks that every architecture
  computes the same logits and gradients with both.

And one for inference only, not a training choice:

- 'folded': `nn.Conv` with a bias and `norm` = the activation alone, for
  parameters whose BatchNorms were folded into the convolutions
  (export/fold_batch_norm.py). Standard ops only, so the graph exports.
"""
import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from mobilenet.ops import batch_norm, convolution, depthwise, norm_depthwise, pointwise

OP_SETS = ('fast', 'plain')  # What a config may train with.
FOLDED = 'folded'
ModuleDef = Any

# He initialization: every convolution here is followed by BatchNorm and, mostly, a ReLU.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')


class PlainBatchNormActivation(nn.BatchNorm):
  """`nn.BatchNorm` followed by `activation` (None: none); the reference for BatchNormActivation."""
  activation: Callable | None = None

  @nn.compact
  def __call__(self, x, use_running_average=None, then=None, **kwargs):
    y = super().__call__(x, use_running_average=use_running_average, **kwargs)
    y = y if self.activation is None else self.activation(y)
    return y if then is None else then(y)


class Activation(nn.Module):
  """What remains of BatchNorm + activation once the BatchNorm is folded: the activation (None: none)."""
  activation: Callable | None = None

  def __call__(self, x, then=None):
    y = x if self.activation is None else self.activation(x)
    return y if then is None else then(y)


class PlainConv(nn.Conv):
  """`nn.Conv` that may be given the BatchNorm + activation before it, as `Conv` is (applied first)."""

  @nn.compact
  def __call__(self, inputs, input_norm=None):
    return super().__call__(inputs if input_norm is None else input_norm(inputs))


class Conv(nn.Module):
  """`nn.Conv` without bias and with 'SAME' padding, computed on the fastest kernel per layer kind.

  Same `kernel` parameter as nn.Conv. Depthwise layers (`feature_group_count`
  = input channels) run on ops/depthwise.py, 1x1 layers on ops/pointwise.py,
  other dense layers on ops/convolution.py; anything else (grouped
  convolutions between the two) on XLA's own convolution.
  """
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = conv_kernel_init
  depthwise_implementation: str = 'auto'
  fuse_input_norm: bool = True  # A depthwise layer lets its input_norm compute both layers.

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, input_norm: Any = None) -> jnp.ndarray:
    """The convolution of `inputs`, or of input_norm(inputs) where `input_norm` is the BatchNorm
    + activation before this layer: a depthwise layer hands itself to it (`then`), so that the
    norm can compute both as one operation (ops/norm_depthwise.py)."""
    if self.use_bias:
      raise ValueError('ops.op_sets.Conv has no bias: every convolution here is followed by BatchNorm')
    channels = inputs.shape[-1]
    kh, kw = self.kernel_size
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, channels // self.feature_group_count, self.features), jnp.float32)
    kernel = kernel.astype(self.dtype)
    if (input_norm is not None and self.fuse_input_norm
        and self.feature_group_count == channels == self.features):
      return input_norm(inputs, then=norm_depthwise.DepthwiseAfter(
          kernel, strides, 'SAME', self.depthwise_implementation)).astype(self.dtype)
    if input_norm is not None:
      inputs = input_norm(inputs)
    x = inputs.astype(self.dtype)
    if self.feature_group_count == channels and self.features % channels == 0:
      return depthwise.depthwise_conv(x, kernel, strides=strides, padding='SAME',
                                      implementation=self.depthwise_implementation)
    if self.feature_group_count == 1 and (kh, kw) == (1, 1) and strides == (1, 1):
      return pointwise.pointwise_conv(x, kernel[0, 0])
    if self.feature_group_count == 1 and strides[0] == strides[1]:
      return convolution.conv(x, kernel, strides=strides[0])
    return lax.conv_general_dilated(x, kernel, strides, 'SAME',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    feature_group_count=self.feature_group_count)


@dataclasses.dataclass(frozen=True)
class OpSet:
  """The module factories a model is built with (see the module docstring)."""
  name: str
  conv: ModuleDef
  norm: ModuleDef


def op_set(name: str, *, train: bool, dtype: Any = jnp.float32, batch_norm_momentum: float = 0.9,
           batch_norm_epsilon: float = 1e-3, depthwise_implementation: str = 'auto',
           fused_training: bool = True) -> OpSet:
  """'plain' or 'fast' convolution and BatchNorm + activation modules, bound to the mode and dtype."""
  norm_settings = dict(use_running_average=not train, momentum=batch_norm_momentum,
                       epsilon=batch_norm_epsilon, dtype=dtype)
  if name == 'plain':
    return OpSet(name,
                 conv=functools.partial(PlainConv, use_bias=False, padding='SAME', dtype=dtype,
                                        kernel_init=conv_kernel_init),
                 norm=functools.partial(PlainBatchNormActivation, **norm_settings))
  if name == 'fast':
    return OpSet(name,
                 conv=functools.partial(Conv, dtype=dtype,
                                        depthwise_implementation=depthwise_implementation,
                                        fuse_input_norm=fused_training),
                 norm=functools.partial(batch_norm.BatchNormActivation, **norm_settings))
  if name == FOLDED:
    if train:
      raise ValueError("the 'folded' op set computes inference only (its BatchNorms are folded)")
    return OpSet(name,
                 conv=functools.partial(PlainConv, use_bias=True, padding='SAME', dtype=dtype),
                 norm=Activation)
  raise ValueError(f'unknown op set {name!r}; choose one of {OP_SETS}')
