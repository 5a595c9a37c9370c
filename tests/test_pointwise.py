"""The pointwise convolution: every implementation computes the same product and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.ops.cpu import kernels as cpu_kernels
from mobilenet.ops import pointwise


def reference(x, w, g):
  """Output and both gradients of sum(g * (x @ w)) in float64."""
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  flat_x, flat_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  return x @ w, (flat_g @ w.T).reshape(x.shape), flat_x.T @ flat_g


@pytest.mark.parametrize('implementation', pointwise.IMPLEMENTATIONS)
@pytest.mark.parametrize('shape,features', [
    ((2, 5, 7, 6), 16),     # One full register tile (AVX2), one 16-wide vector (AVX-512).
    ((3, 4, 4, 13), 24),    # Partial tiles both ways.
    ((4, 8, 8, 7), 88),     # A full AVX-512 tile (64), a 16-wide and an 8-wide remainder.
    ((4, 8, 8, 32), 128),   # Full tiles only.
    ((2, 2, 2, 64), 64),    # Few positions for the channels: XLA's dot.
    ((1, 2, 2, 3), 8),
    ((64, 16, 16, 8), 16),  # Many row blocks, split between threads.
    ((2, 3, 3, 5), 12),     # Not a multiple of 8: the kernel defers to XLA.
])
def test_matches_float64_reference(implementation, shape, features):
  if implementation == 'cpu_kernel' and not cpu_kernels.available():
    pytest.skip(f'C++ kernels unavailable: {cpu_kernels.error()}')
  rng = np.random.default_rng(features)
  x = rng.standard_normal(shape).astype(np.float32)
  w = rng.standard_normal((shape[-1], features)).astype(np.float32)
  g = rng.standard_normal((*shape[:-1], features)).astype(np.float32)

  def loss(x, w):
    return jnp.sum(g * pointwise.pointwise_conv(x, w, implementation=implementation))

  y = jax.jit(lambda x, w: pointwise.pointwise_conv(x, w, implementation=implementation))(x, w)
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  want_y, want_dx, want_dw = reference(x, w, g)
  scale = np.sqrt(np.prod(shape[:-1]))  # The filter gradient sums that many products.
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-5 * scale)


def test_bfloat16_gradients_keep_the_dtype():
  x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
  w = jnp.full((8, 16), 0.5, jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: jnp.sum(pointwise.pointwise_conv(x, w).astype(jnp.float32)),
                    argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw, np.float32), 32.0)  # 2*4*4 positions of 1.0.


def test_auto_is_the_kernel_on_cpu_only():
  expected = 'cpu_kernel' if cpu_kernels.available() else 'xla'
  assert pointwise.resolve_implementation('auto', 'cpu') == expected
  assert pointwise.resolve_implementation('auto', 'gpu') == 'xla'
  with pytest.raises(ValueError, match='unknown pointwise implementation'):
    pointwise.resolve_implementation('blas')


@pytest.mark.parametrize('shape,features,on_kernel', [
    ((4, 8, 8, 32), 128, True), ((2, 2, 2, 64), 64, False), ((4, 8, 8, 32), 12, False)])
def test_the_kernel_takes_the_filter_gradient_where_it_is_faster(shape, features, on_kernel):
  if not cpu_kernels.available():
    pytest.skip(f'C++ kernels unavailable: {cpu_kernels.error()}')
  x = jnp.ones(shape, jnp.float32)
  w = jnp.ones((shape[-1], features), jnp.float32)
  grad = jax.grad(lambda w: jnp.sum(pointwise.pointwise_conv(x, w, implementation='cpu_kernel')))
  assert ('mobilenet_pointwise_filter_grad' in jax.jit(grad).lower(w).as_text()) == on_kernel


@pytest.mark.parametrize('shape,features,forward_on_kernel,input_grad_on_kernel', [
    ((4, 8, 8, 32), 128, True, True),
    ((2, 2, 2, 512), 64, False, True),  # 512 channels summed: XLA's dot is as fast.
    ((4, 8, 8, 32), 12, False, False),  # Not a multiple of 8 outputs: all of it on XLA.
    ((4, 8, 8, 12), 16, True, False),  # The input gradient's outputs: 12.
])
def test_the_kernel_takes_the_products_where_it_is_faster(shape, features, forward_on_kernel,
                                                          input_grad_on_kernel):
  if not cpu_kernels.available():
    pytest.skip(f'C++ kernels unavailable: {cpu_kernels.error()}')
  x = jnp.ones(shape, jnp.float32)
  w = jnp.ones((shape[-1], features), jnp.float32)
  count = lambda fn, *args: jax.jit(fn).lower(*args).as_text().count(
      'mobilenet_pointwise_inference')
  conv = lambda x, w: pointwise.pointwise_conv(x, w, implementation='cpu_kernel')
  assert count(conv, x, w) == forward_on_kernel
  input_grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2))  # The forward product is kept.
  assert count(input_grad, x, w) == forward_on_kernel + input_grad_on_kernel


def test_the_filter_gradient_kernel_refuses_an_output_it_would_overrun():
  """Declared per-example (without calls.py's `combine`), the output is (rows, D), not (C, D)."""
  if not cpu_kernels.available():
    pytest.skip(f'C++ kernels unavailable: {cpu_kernels.error()}')
  from mobilenet.ops.cpu import calls  # pylint: disable=import-outside-toplevel
  x, dy = jnp.ones((8, 64), jnp.float32), jnp.ones((8, 128), jnp.float32)
  with pytest.raises(Exception, match='dw must be'):
    jax.block_until_ready(calls.kernel_call(
        'mobilenet_pointwise_filter_grad', [jax.ShapeDtypeStruct((64, 128), jnp.float32)], [x, dy],
        batched=(True, True)))
