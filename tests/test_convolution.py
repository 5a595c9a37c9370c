"""The stem's dense convolution: every implementation computes XLA's convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.ops import convolution
from mobilenet.ops.cpu import kernels as cpu_kernels


@pytest.mark.parametrize('implementation', [pytest.param('patches', marks=pytest.mark.slow),
                                            'cpu_kernel', 'auto'])
@pytest.mark.parametrize('strides,size,channels,features',
                         [(1, 8, 3, 16), (2, 9, 3, 8), (2, 8, 5, 12), (1, 7, 1, 3), (2, 10, 3, 40),
                          (1, 1, 3, 8), (1, 6, 2, 24),
                          # Rows longer than any of the kernel's passes (pixels or patch
                          # positions at a time) with remainders, and one to eight 8-lane
                          # channel vectors (8 to 64 output channels).
                          (1, 34, 3, 32), (2, 40, 3, 16), (1, 21, 3, 24), (1, 20, 3, 48),
                          (2, 36, 3, 64),
                          # Rows shorter than the forward's register tile of pixels.
                          (2, 5, 3, 32)])
def test_standard_conv_implementations_match_xla(implementation, strides, size, channels,
                                                 features):
  rng = np.random.default_rng(size)
  x = jnp.asarray(rng.standard_normal((2, size, size, channels)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, channels, features)), jnp.float32)

  def xla_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (strides, strides), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        precision='highest')

  def patches(x, k):
    return convolution.conv(x, k, strides=strides, implementation=implementation)

  np.testing.assert_allclose(patches(x, kernel), xla_conv(x, kernel), rtol=1e-5, atol=1e-5)
  grad = lambda fn: jax.grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k))), argnums=(0, 1))(x, kernel)
  for want, have in zip(grad(xla_conv), grad(patches)):
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4)


def test_auto_convolution_is_the_kernel_on_cpu_only():
  expected = 'cpu_kernel' if cpu_kernels.available() else 'patches'
  assert convolution.resolve_implementation('auto', 'cpu') == expected
  assert convolution.resolve_implementation('auto', 'gpu') == 'xla'
  with pytest.raises(ValueError, match='unknown convolution implementation'):
    convolution.resolve_implementation('winograd')
