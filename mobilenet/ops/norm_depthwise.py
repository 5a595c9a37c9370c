"""Training-mode BatchNorm + activation feeding a depthwise convolution, as one operation.

In MobileNetV2/V3's inverted residual block the expansion's BatchNorm +
activation produces the block's largest tensor: the expanded channels at the
block's input resolution; in MobileNetV1 each block's last BatchNorm + ReLU
produces the tensor the next block's depthwise layer reads (as does the stem's
before a first block without expansion). As two layers, that tensor is
written by the BatchNorm's apply pass, read back by the depthwise convolution
and kept until the backward pass for the depthwise filter gradient. Here it
never exists:

- forward: the batch statistics of the raw input (one read), then the
  depthwise C++ kernel applies BatchNorm + activation to the raw input as it
  reads it (the input side of the fused-inference kernel);
- backward: one kernel (`activated_backward_kernel_call`) reads each image's
  raw input once for the filter gradient (the activated input recomputed as
  it is read), the input gradient at the activated input, and the
  BatchNorm's two backward sums over it; then the BatchNorm's input-gradient
  kernel, as for the layer alone.

It computes `depthwise_conv(activation(BatchNorm(x)), kernel)` with the batch
statistics: the same values and gradients up to float32 rounding
(tests/test_norm_depthwise.py checks both against the two layers and against
plain Flax). Modules reach it through one mechanism: a convolution module
called with the BatchNorm + activation before it (`conv(...)(x,
input_norm=norm)`, models/blocks.py; across blocks the builder passes a
block's last norm on to the next) hands the norm a `DepthwiseAfter`, and
the 'fast' BatchNorm module (ops/batch_norm.py) takes this path in training
where `DepthwiseAfter.fuses` says the kernels apply; everywhere else the two
layers run one after the other.
"""
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mobilenet.ops import batch_norm, depthwise
from mobilenet.ops.cpu import kernels as cpu_kernels


@dataclasses.dataclass(frozen=True)
class DepthwiseAfter:
  """The depthwise convolution that a BatchNorm + activation feeds: what its `then` argument is.

  Called on the BatchNorm's output it is that convolution (`depthwise.depthwise_conv`);
  `fused_train` computes both layers at once where `fuses` allows.
  """
  kernel: Any  # (kh, kw, 1, C): nn.Conv's depthwise kernel, multiplier 1.
  strides: Sequence[int]
  padding: depthwise.Padding
  implementation: str  # The depthwise implementation the layer asked for (ops/select.py).

  def __call__(self, y):
    return depthwise.depthwise_conv(y, self.kernel, strides=self.strides, padding=self.padding,
                                    implementation=self.implementation)

  def fuses(self, x, activation: Callable) -> bool:
    """Whether `fused_train` applies: float32, the depthwise layer on the C++ kernel, a 3x3 or 5x5
    filter over a multiple of 8 channels (multiplier 1), an activation the kernels compute."""
    kh, kw, _, out_channels = self.kernel.shape
    return (x.dtype == jnp.float32 and self.kernel.dtype == jnp.float32
            and depthwise.resolve_implementation(self.implementation) == 'cpu_kernel'
            and cpu_kernels.available() and kh == kw and kh in (3, 5)
            and out_channels == x.shape[-1] and out_channels % 8 == 0
            and activation in batch_norm.KERNEL_ACTIVATIONS)

  def fused_train(self, x, scale, bias, epsilon: float, activation: Callable):
    """(depthwise(activation(BatchNorm(x))), batch mean, batch var) in one operation."""
    kh, kw, _, channels = self.kernel.shape
    pads = depthwise.explicit_padding(x.shape[1:3], (kh, kw), self.strides, self.padding)
    return _train(x, scale, bias, self.kernel.reshape(kh, kw, channels),
                  (epsilon, activation, tuple(self.strides), pads))


def _forward(x, scale, bias, kernel, settings):
  epsilon, activation, strides, pads = settings
  mean, var, inv_std, (a, b) = batch_norm.kernel_statistics(x, scale, bias, epsilon)
  ones, zeros = jnp.ones_like(a), jnp.zeros_like(b)
  y = depthwise.inference_kernel_call(x, kernel, a, b, ones, zeros, strides=strides, pads=pads,
                                      input_activation=activation,
                                      output_activation=batch_norm.identity)
  return (y, mean, var), (x, kernel, a, b, mean, inv_std, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _train(x, scale, bias, kernel, settings):
  """x (N, H, W, C) float32, kernel (k, k, C); settings (epsilon, activation, strides, pads)."""
  return _forward(x, scale, bias, kernel, settings)[0]


def _train_bwd(settings, residuals, cotangents):
  # The statistics feed only the running averages: their cotangents are ignored.
  _, activation, strides, pads = settings
  x, kernel, a, b, mean, inv_std, scale, bias = residuals
  d_kernel, d_activated, sum_g, sum_gx = depthwise.activated_backward_kernel_call(
      x, cotangents[0], kernel, a, b, mean, strides=strides, pads=pads,
      input_activation=activation)
  dx, d_scale, d_bias = batch_norm.kernel_backward_from_sums(
      x, mean, inv_std, scale, bias, d_activated, (sum_g, sum_gx),
      batch_norm.KERNEL_ACTIVATIONS[activation])
  return dx, d_scale, d_bias, d_kernel


_train.defvjp(_forward, _train_bwd)
