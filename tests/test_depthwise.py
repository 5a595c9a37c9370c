"""Every depthwise implementation against a float64 numpy reference: outputs and gradients."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.ops.cpu import kernels as cpu_kernels
from mobilenet.ops import depthwise


def _reference_windows(x, w, strides, padding):
  """Yields (dy, dx, index) where xpad[index] is the window filter tap (dy, dx) multiplies."""
  kh, kw, _, _ = w.shape
  (plh, phh), (plw, phw) = depthwise.explicit_padding(x.shape[1:3], (kh, kw), strides, padding)
  padded_shape = (x.shape[0], x.shape[1] + plh + phh, x.shape[2] + plw + phw, w.shape[-1])
  out_h = (padded_shape[1] - kh) // strides[0] + 1
  out_w = (padded_shape[2] - kw) // strides[1] + 1
  for dy, dx in itertools.product(range(kh), range(kw)):
    yield dy, dx, (slice(None), slice(dy, dy + strides[0] * (out_h - 1) + 1, strides[0]),
                   slice(dx, dx + strides[1] * (out_w - 1) + 1, strides[1]), slice(None))


def _pad_repeat(x, w, strides, padding):
  """The float64, multiplier-repeated, padded input and the padding used."""
  kh, kw, _, cm = w.shape
  x = np.repeat(np.asarray(x, np.float64), cm // x.shape[-1], axis=-1)
  pads = depthwise.explicit_padding(x.shape[1:3], (kh, kw), strides, padding)
  xp = np.pad(x, ((0, 0), (max(pads[0][0], 0), max(pads[0][1], 0)),
                  (max(pads[1][0], 0), max(pads[1][1], 0)), (0, 0)))
  return xp, pads


def reference_depthwise(x, w, strides, padding):
  """Direct float64 loop over filter taps; w is (kh, kw, 1, C * m)."""
  xp, _ = _pad_repeat(x, w, strides, padding)
  w = np.asarray(w, np.float64)
  out = 0.
  for dy, dx, index in _reference_windows(x, w, strides, padding):
    out = out + xp[index] * w[dy, dx, 0]
  return out


def reference_grads(x, w, strides, padding, cotangent):
  """Float64 gradients of sum(reference * cotangent) wrt x and w, by scatter-adds."""
  xp, pads = _pad_repeat(x, w, strides, padding)
  w = np.asarray(w, np.float64)
  g = np.asarray(cotangent, np.float64)
  gxp = np.zeros_like(xp)
  gw = np.zeros_like(w)
  for dy, dx, index in _reference_windows(x, w, strides, padding):
    gxp[index] += g * w[dy, dx, 0]
    gw[dy, dx, 0] = np.sum(xp[index] * g, axis=(0, 1, 2))
  (plh, _), (plw, _) = pads
  gx = gxp[:, plh:plh + x.shape[1], plw:plw + x.shape[2], :]
  m = w.shape[-1] // x.shape[-1]
  return gx.reshape(*x.shape, m).sum(-1), gw


CASES = [
    # (size, channels, multiplier, strides, padding, kernel)
    (8, 4, 1, (1, 1), 'SAME', 3),  # Even size, stride 1.
    (7, 3, 1, (2, 2), 'SAME', 3),  # Odd size, stride 2.
    (8, 3, 2, (2, 2), 'SAME', 3),  # Multiplier 2, even size, stride 2.
    (7, 2, 2, (1, 1), 'SAME', 3),  # Multiplier 2, odd size, stride 1.
    (9, 3, 1, (2, 1), 'VALID', 3),
    (8, 2, 1, (2, 2), 'VALID', 3),
    (9, 2, 1, (2, 2), 'SAME', 5),  # Larger kernel: three phases per axis.
    (6, 2, 1, (1, 2), ((2, 0), (1, 1)), 3),  # Explicit, asymmetric padding.
    # Multiples of 8 channels with a 3x3 or 5x5 filter take the C++ kernel's vectorized loops.
    (8, 8, 1, (1, 1), 'SAME', 3),
    (7, 16, 1, (2, 2), 'SAME', 3),
    (9, 8, 2, (2, 1), 'VALID', 3),
    (6, 8, 1, (1, 2), ((2, 0), (1, 1)), 3),
    (5, 8, 1, (1, 1), ((3, 1), (0, 2)), 3),  # Padding beyond the filter: general input gradient.
    # Stride 2 both ways (the downsampling layers); even sizes pad only below and right.
    (8, 16, 1, (2, 2), 'SAME', 3),
    (7, 8, 1, (2, 2), ((2, 0), (1, 1)), 3),
    (6, 8, 1, (2, 2), ((4, 1), (0, 3)), 3),  # Padding beyond the filter.
    (10, 8, 1, (2, 2), 'SAME', 5),
    (2, 8, 1, (2, 2), 'SAME', 5),  # Narrower than the filter.
    (1, 8, 1, (1, 1), 'SAME', 3),  # Narrower than the filter: no interior columns.
    # ... and with a 5x5 filter (MobileNetV3).
    (9, 8, 1, (1, 1), 'SAME', 5),
    (9, 16, 1, (2, 2), 'SAME', 5),
    (8, 8, 1, (2, 1), 'VALID', 5),
    (7, 8, 1, (1, 2), ((4, 0), (1, 3)), 5),
    (7, 8, 1, (1, 1), ((5, 1), (0, 2)), 5),  # Padding beyond the filter: general input gradient.
    (3, 8, 1, (1, 1), 'SAME', 5),  # Narrower than the filter: no interior columns.
]


@pytest.mark.parametrize('implementation', depthwise.IMPLEMENTATIONS)
@pytest.mark.parametrize('size,channels,multiplier,strides,padding,kernel', CASES)
def test_matches_float64_reference(implementation, size, channels, multiplier, strides, padding, kernel):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, size, size + 1, channels)).astype(np.float32)
  w = rng.standard_normal((kernel, kernel, 1, channels * multiplier)).astype(np.float32)

  def apply(x, w):
    return depthwise.depthwise_conv(x, w, strides=strides, padding=padding,
                                    implementation=implementation)

  expected = reference_depthwise(x, w, strides, padding)
  cotangent = rng.standard_normal(expected.shape).astype(np.float32)

  @jax.jit  # One compilation per case instead of one per primitive keeps the test fast.
  def forward_and_grads(x, w, cotangent):
    out, vjp = jax.vjp(apply, x, w)
    return out, *vjp(cotangent)

  out, gx, gw = forward_and_grads(x, w, cotangent)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  ref_gx, ref_gw = reference_grads(x, w, strides, padding, cotangent)
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gw, ref_gw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('implementation', depthwise.IMPLEMENTATIONS)
def test_bfloat16_accumulates_in_float32(implementation):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 9, 9, 4)).astype(np.float32)
  w = rng.standard_normal((3, 3, 1, 4)).astype(np.float32)

  def loss(x, w):
    out = depthwise.depthwise_conv(x, w, strides=(2, 2), implementation=implementation)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  (_, out), (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
  assert out.dtype == gx.dtype == gw.dtype == jnp.bfloat16
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  wb = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32))
  expected = reference_depthwise(xb, wb, (2, 2), 'SAME')
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=5e-2)


def test_implementations_agree_under_jit_and_grad():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 16, 16, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 1, 8)), jnp.float32)

  @jax.jit
  def grads(x, w):
    return {name: jax.grad(lambda x, w: jnp.sum(jnp.sin(depthwise.depthwise_conv(
        x, w, strides=(2, 2), implementation=name))), argnums=(0, 1))(x, w)
            for name in depthwise.IMPLEMENTATIONS}

  results = grads(x, w)
  for name in depthwise.IMPLEMENTATIONS[1:]:
    for got, want in zip(results[name], results['xla']):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_auto_resolves_per_backend():
  expected_cpu = 'cpu_kernel' if cpu_kernels.available() else 'shifted'
  assert depthwise.resolve_implementation('auto', 'cpu') == expected_cpu
  assert depthwise.resolve_implementation('auto', 'gpu') == 'xla'
  assert depthwise.resolve_implementation('auto', 'tpu') == 'xla'
  assert depthwise.resolve_implementation('auto') in depthwise.IMPLEMENTATIONS
  with pytest.raises(ValueError, match='unknown depthwise implementation'):
    depthwise.resolve_implementation('fft')
