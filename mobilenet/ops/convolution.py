"""Standard (dense) k x k 'SAME' convolutions, NHWC inputs and (k, k, C, N) kernels.

Three implementations of the same function (ops/select.py says which one
'auto' is):

- 'xla': `lax.conv_general_dilated`. Used on GPU and TPU.
- 'patches': k*k shifted (strided) slices concatenated into patches, then one
  matrix product with the kernel. XLA:CPU computes the plain convolution's
  filter gradient through a slow generic path (~35-50 ms per step for the
  stem at batch 128, 32x32); the product's gradients are matrix products
  (8-11 ms with the patches copy included).
- 'cpu_kernel': C++ loops (`convolution_cpu.cc`) for the forward pass and the
  filter gradient that read each input pixel in place rather than through a
  copy 9x the image's size; the input gradient (not needed for a stem, so XLA
  drops it) is the patches form's. Needs a multiple of 8 output channels;
  other counts run as 'patches'.

"""
import functools

import jax
import jax.numpy as jnp

from mobilenet.ops.cpu import kernels as cpu_kernels
from mobilenet.ops import depthwise, select

IMPLEMENTATIONS = select.IMPLEMENTATIONS['convolution']


def conv_xla(inputs, kernel, strides: int):
  return jax.lax.conv_general_dilated(inputs, kernel, (strides, strides), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _same_pads(inputs, kernel, strides: int):
  return depthwise.explicit_padding(inputs.shape[1:3], kernel.shape[:2], (strides, strides), 'SAME')


def conv_as_patches(inputs, kernel, strides: int):
  """The convolution as patches @ kernel.reshape(k*k*C, N)."""
  return _patches_product(inputs, kernel, strides, _same_pads(inputs, kernel, strides))


def _patches_product(inputs, kernel, strides: int, pads):
  kh, kw, in_channels, out_channels = kernel.shape
  padded = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
  out_h = (padded.shape[1] - kh) // strides + 1
  out_w = (padded.shape[2] - kw) // strides + 1
  taps = [padded[:, a:a + (out_h - 1) * strides + 1:strides, b:b + (out_w - 1) * strides + 1:strides]
          for a in range(kh) for b in range(kw)]
  # (N, H, W, kh*kw*C) in (a, b, c) order, the order of kernel.reshape(kh*kw*C, N).
  patches = jnp.concatenate(taps, axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw * in_channels, out_channels))


def _kernel_call(name, out_shape, first, second, strides: int, pads):
  """Calls one compiled kernel on float32 operands."""
  return cpu_kernels.call_strided(f'mobilenet_conv_{name}', out_shape, first, second,
                                  (strides, strides), pads, reduces=name == 'filter_grad')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _kernel_conv(x, w, strides: int, pads):
  """x (N, H, W, C) and w (kh, kw, C, O) float32, O a multiple of 8."""
  out_h = (x.shape[1] + sum(pads[0]) - w.shape[0]) // strides + 1
  out_w = (x.shape[2] + sum(pads[1]) - w.shape[1]) // strides + 1
  return _kernel_call('forward', (x.shape[0], out_h, out_w, w.shape[3]), x, w, strides, pads)


def _kernel_conv_fwd(x, w, strides, pads):
  return _kernel_conv(x, w, strides, pads), (x, w)


def _kernel_conv_bwd(strides, pads, residuals, g):
  x, w = residuals
  dw = _kernel_call('filter_grad', w.shape, x, g, strides, pads)
  _, input_vjp = jax.vjp(lambda x: _patches_product(x, w, strides, pads), x)
  dx, = input_vjp(g)
  return dx, dw


_kernel_conv.defvjp(_kernel_conv_fwd, _kernel_conv_bwd)


def conv_cpu_kernel(inputs, kernel, strides: int):
  """The C++ CPU kernel ('patches' when the output channels are not a multiple of 8)."""
  if not cpu_kernels.available():
    raise RuntimeError("convolution implementation 'cpu_kernel' is unavailable: "
                       f'{cpu_kernels.error()}')
  if kernel.shape[-1] % 8:
    return conv_as_patches(inputs, kernel, strides)
  out = _kernel_conv(inputs.astype(jnp.float32), kernel.astype(jnp.float32), strides,
                     _same_pads(inputs, kernel, strides))
  return out.astype(inputs.dtype)


def resolve_implementation(name: str, backend: str = None) -> str:
  """Maps 'auto' to the fastest implementation measured on `backend` (ops/select.py)."""
  return select.resolve('convolution', name, backend)


_REGISTRY = {'xla': conv_xla, 'patches': conv_as_patches, 'cpu_kernel': conv_cpu_kernel}


def conv(inputs, kernel, *, strides: int = 1, implementation: str = 'auto'):
  """'SAME' convolution of NHWC `inputs` with a (k, k, C, N) `kernel`."""
  implementation = resolve_implementation(implementation)
  return _REGISTRY[implementation](inputs, kernel, strides)
