"""The pointwise (1x1) convolution: a matrix product over the channel axis.

Two implementations of the same function, NHWC `inputs` and a (C, D) kernel
(ops/select.py says which one 'auto' is):

- 'xla': `jnp.einsum`, with XLA's own gradients. Used on GPU and TPU.
- 'cpu_kernel': the same forward and input gradient, with the filter gradient
  (x^T dy over all N*H*W positions) on a C++ kernel (`pointwise_cpu.cc`).
  XLA:CPU runs that product as a plain dot on a transposed copy, at 1-5
  GMAC/s for the early layers' few channels on an AVX2 machine (30% of the
  alpha-0.25 training step) and at half the kernel's rate on an AVX-512 one.
  Needs a multiple of 8 output channels; others run as 'xla'. Where the
  positions are few against the channels (the last layers: 512 positions
  for a 1024 x 1024 gradient), the kernel's per-thread partial products cost
  more than they save and XLA's dot is faster: there it defers to XLA too.

"""
import jax
import jax.numpy as jnp

from mobilenet.ops import select
from mobilenet.ops.cpu import calls
from mobilenet.ops.cpu import kernels as cpu_kernels

IMPLEMENTATIONS = select.IMPLEMENTATIONS['pointwise']


def pointwise_conv_xla(inputs, kernel):
  return jnp.einsum('...c,cd->...d', inputs, kernel)


@jax.custom_vjp
def _kernel_pointwise(x, w):
  return pointwise_conv_xla(x, w)


def _kernel_pointwise_fwd(x, w):
  return pointwise_conv_xla(x, w), (x, w)


def _kernel_pointwise_bwd(residuals, g):
  x, w = residuals
  dx = jnp.einsum('...d,cd->...c', g, w)
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
