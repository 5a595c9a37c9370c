"""The pointwise (1x1) convolution: a matrix product over the channel axis.

Two implementations of the same function, NHWC `inputs` and a (C, D) kernel
(ops/select.py says which one 'auto' is):

- 'xla': `jnp.einsum`, with XLA's own gradients. Used on GPU and TPU.
- 'cpu_kernel': the same function on C++ kernels (`pointwise_cpu.cc`).
  The filter gradient (x^T dy over all N*H*W positions): XLA:CPU runs that
  product as a plain dot on a transposed copy, at 1-5 GMAC/s for the early
  layers' few channels on an AVX2 machine (30% of the alpha-0.25 training
  step) and at half the kernel's rate on an AVX-512 one. Needs a multiple of
  8 output channels; others run as 'xla'. Where the positions are few against
  the channels (the last layers: 512 positions for a 1024 x 1024 gradient),
  the kernel's per-thread partial products cost more than they save and XLA's
  dot is faster: there it defers to XLA too. The forward product and the
  input gradient (dy @ w^T) run on the inference forward kernel below where
  they sum over at most 256 channels into a multiple of 8 (V3-Small's
  products, 1.1-3x faster than XLA's), else on XLA's dot.

`pointwise_inference` is the inference forward with what follows the product
(BatchNorm as a per-channel affine map, the activation, the residual add, and
squeeze-and-excitation's gate on the input) in one pass, on a C++ kernel where
it can (models/fused_inference.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mobilenet.ops import batch_norm
from mobilenet.ops import select
from mobilenet.ops.cpu import calls
from mobilenet.ops.cpu import kernels as cpu_kernels

IMPLEMENTATIONS = select.IMPLEMENTATIONS['pointwise']


def pointwise_conv_xla(inputs, kernel):
  return jnp.einsum('...c,cd->...d', inputs, kernel)


# Up to this many channels summed over (one chunk of pointwise_cpu.cc's forward loop) the C++
# product is faster than XLA's for MobileNet's shapes; beyond, XLA's dot is as fast or faster
# (docs/performance.md, tenth round).
_PRODUCT_MAX_SUMMED = 256


def kernel_product_pays(in_channels: int, out_channels: int) -> bool:
  """Whether the C++ forward kernel computes a raw (C, D) product faster than XLA's dot here."""
  return (in_channels <= _PRODUCT_MAX_SUMMED and out_channels % 8 == 0
          and cpu_kernels.available())


def matrix_product(x, w):
  """x @ w: on the C++ forward kernel where it is faster (see _PRODUCT_MAX_SUMMED), else XLA's."""
  if (not kernel_product_pays(*w.shape) or x.dtype != jnp.float32 or w.dtype != jnp.float32):
    return pointwise_conv_xla(x, w)
  channels = w.shape[1]
  return _forward_call(x, w, jnp.ones(channels, jnp.float32), jnp.zeros(channels, jnp.float32),
                       None, None, batch_norm.KERNEL_ACTIVATIONS[batch_norm.identity])


@jax.custom_vjp
def _kernel_pointwise(x, w):
  return matrix_product(x, w)


def _kernel_pointwise_fwd(x, w):
  return matrix_product(x, w), (x, w)


def _kernel_pointwise_bwd(residuals, g):
  x, w = residuals
  dx = matrix_product(g, w.T)
  if x.size // x.shape[-1] < 2 * max(w.shape):  # Few positions (see the module docstring).
    return dx, jnp.einsum('...c,...d->cd', x, g).astype(w.dtype)
  # x^T g sums over the batch: per-shard partial products, all-reduced (calls.py).
  dw, = calls.kernel_call('mobilenet_pointwise_filter_grad',
                          [jax.ShapeDtypeStruct(w.shape, jnp.float32)],
                          [x.astype(jnp.float32), g.astype(jnp.float32)],
                          batched=(True, True), combine=calls.psum_combine)
  return dx, dw.astype(w.dtype)


_kernel_pointwise.defvjp(_kernel_pointwise_fwd, _kernel_pointwise_bwd)


def pointwise_conv_cpu_kernel(inputs, kernel):
  """The C++ filter gradient ('xla' when the output channels are not a multiple of 8)."""
  if not cpu_kernels.available():
    raise RuntimeError("pointwise implementation 'cpu_kernel' is unavailable: "
                       f'{cpu_kernels.error()}')
  if kernel.shape[-1] % 8:
    return pointwise_conv_xla(inputs, kernel)
  return _kernel_pointwise(inputs, kernel)


def resolve_implementation(name: str, backend: str = None) -> str:
  """Maps 'auto' to the fastest implementation measured on `backend` (ops/select.py)."""
  return select.resolve('pointwise', name, backend)


_REGISTRY = {'xla': pointwise_conv_xla, 'cpu_kernel': pointwise_conv_cpu_kernel}


def pointwise_conv(inputs, kernel, *, implementation: str = 'auto'):
  """inputs (..., C) @ kernel (C, D)."""
  return _REGISTRY[resolve_implementation(implementation)](inputs, kernel)


def pointwise_inference(inputs, kernel, *, scale, bias, activation, residual=None, gate=None):
  """activation(((inputs * gate) @ kernel) * scale + bias) + residual, in float32.

  `inputs` (N, ..., C), `kernel` (C, D), `scale` and `bias` (D,) (an
  inference-mode BatchNorm as x * scale + bias, or a dense layer's bias with
  `scale` ones); `residual` (N, ..., D) or None; `gate` (N, C) or None, the
  squeeze-and-excitation multiplier of each image's input channels. The
  activation: one of `batch_norm.KERNEL_ACTIVATIONS` (ReLU, ReLU6, hard-swish,
  `batch_norm.identity`) or `jax.nn.hard_sigmoid`. On the C++ kernel
  (`pointwise_cpu.cc`) where the kernels are built and D is a multiple of 8,
  else as XLA steps (`_inference_xla`); gradients are the XLA form's.
  """
  f32 = lambda value: None if value is None else jnp.asarray(value, jnp.float32)
  operands = tuple(map(f32, (inputs, kernel, scale, bias, residual, gate)))
  if (cpu_kernels.available() and kernel.shape[-1] % 8 == 0
      and (activation in batch_norm.KERNEL_ACTIVATIONS or activation is jax.nn.hard_sigmoid)):
    return _inference_kernel(*operands, activation)
  return _inference_xla(*operands, activation)


def _inference_xla(inputs, kernel, scale, bias, residual, gate, activation):
  """pointwise_inference as XLA steps: its reference and VJP."""
  if gate is not None:
    inputs = inputs * gate.reshape(gate.shape[0], *(1,) * (inputs.ndim - 2), gate.shape[1])
  y = activation(pointwise_conv_xla(inputs, kernel) * scale + bias)
  return y if residual is None else y + residual


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _inference_kernel(inputs, kernel, scale, bias, residual, gate, activation):
  if activation is jax.nn.hard_sigmoid:  # relu6(z + 3) / 6 = clip(z / 6 + 1/2, 0, 1).
    return _forward_call(inputs, kernel, scale / 6.0, bias / 6.0 + 0.5, residual, gate,
                         (0, 0.0, 1.0))
  return _forward_call(inputs, kernel, scale, bias, residual, gate,
                       batch_norm.KERNEL_ACTIVATIONS[activation])


def _forward_call(inputs, kernel, scale, bias, residual, gate, kernel_activation):
  """The C++ forward kernel, per example (sharded and vmappable through calls.py)."""
  kind, lo, hi = kernel_activation
  empty = jnp.zeros((0,), jnp.float32)  # An absent residual or gate.
  out_shape = jax.ShapeDtypeStruct((*inputs.shape[:-1], kernel.shape[-1]), jnp.float32)
  out, = calls.kernel_call(
      'mobilenet_pointwise_inference', [out_shape],
      [inputs, kernel, scale, bias, empty if residual is None else residual,
       empty if gate is None else gate],
      batched=(True, False, False, False, residual is not None, gate is not None),
      activation=np.int32(kind), lo=np.float32(lo), hi=np.float32(hi))
  return out


def _inference_kernel_fwd(*args):
  return _inference_kernel(*args), args[:-1]


def _inference_kernel_bwd(activation, residuals, g):
  # Gradients of a fused inference graph are rare (attribution): the XLA form's.
  _, vjp = jax.vjp(lambda *args: _inference_xla(*args, activation), *residuals)
  return vjp(g)


_inference_kernel.defvjp(_inference_kernel_fwd, _inference_kernel_bwd)
