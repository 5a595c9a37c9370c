"""Standard (dense) k x k 'SAME' convolutions, NHWC inputs and (k, k, C, N) kernels.

Two implementations of the same function; `StandardConv` in layers.py picks
one by name:

- 'xla': `lax.conv_general_dilated`. Used on GPU and TPU.
- 'patches': k*k shifted (strided) slices concatenated into patches, then one
  matrix product with the kernel. XLA:CPU computes the plain convolution's
  filter gradient through a slow generic path (~35-50 ms per step for the
  stem at batch 128, 32x32); the product's gradients are matrix products
  (8-11 ms with the patches copy included). A C++ loop like the depthwise
  kernel's was tried and was no faster.

'auto' picks 'patches' on CPU and 'xla' on every other backend.
"""
import jax
import jax.numpy as jnp

from mobilenet import depthwise

IMPLEMENTATIONS = ('xla', 'patches')


def conv_xla(inputs, kernel, strides: int):
  return jax.lax.conv_general_dilated(inputs, kernel, (strides, strides), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv_as_patches(inputs, kernel, strides: int):
  """The convolution as patches @ kernel.reshape(k*k*C, N)."""
  kh, kw, in_channels, out_channels = kernel.shape
  pads = depthwise.explicit_padding(inputs.shape[1:3], (kh, kw), (strides, strides), 'SAME')
  padded = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
  out_h = (padded.shape[1] - kh) // strides + 1
  out_w = (padded.shape[2] - kw) // strides + 1
  taps = [padded[:, a:a + (out_h - 1) * strides + 1:strides, b:b + (out_w - 1) * strides + 1:strides]
          for a in range(kh) for b in range(kw)]
  # (N, H, W, kh*kw*C) in (a, b, c) order, the order of kernel.reshape(kh*kw*C, N).
  patches = jnp.concatenate(taps, axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw * in_channels, out_channels))


def resolve_implementation(name: str, backend: str = None) -> str:
  """Maps 'auto' to the implementation measured fastest for this backend."""
  if name not in IMPLEMENTATIONS + ('auto',):
    raise ValueError(f'unknown convolution implementation {name!r}; choose one of '
                     f'{IMPLEMENTATIONS} or "auto"')
  if name != 'auto':
    return name
  return 'patches' if (backend or jax.default_backend()) == 'cpu' else 'xla'


_REGISTRY = {'xla': conv_xla, 'patches': conv_as_patches}


def conv(inputs, kernel, *, strides: int = 1, implementation: str = 'auto'):
  """'SAME' convolution of NHWC `inputs` with a (k, k, C, N) `kernel`."""
  implementation = resolve_implementation(implementation)
  return _REGISTRY[implementation](inputs, kernel, strides)
