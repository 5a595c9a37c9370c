"""Depthwise convolution implementations (functional, no parameters).

Every implementation computes the same function as XLA's grouped convolution
with `feature_group_count` = input channels; `DepthwiseConv` in layers.py picks
one by name.
"""
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla',)


def depthwise_conv_xla(inputs, kernel, strides, padding):
  """XLA grouped convolution: NHWC inputs, kernel (kh, kw, 1, C * multiplier)."""
  return jax.lax.conv_general_dilated(
      inputs, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=inputs.shape[-1])


def resolve_implementation(name: str) -> str:
  """Maps 'auto' to the fastest implementation measured on the current backend."""
  if name == 'auto':
    return 'xla'
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'unknown depthwise implementation {name!r}; choose one of {IMPLEMENTATIONS} or "auto"')
  return name


def depthwise_conv(inputs: jnp.ndarray, kernel: jnp.ndarray, *, strides=(1, 1), padding='SAME',
                   implementation: str = 'auto') -> jnp.ndarray:
  """Depthwise convolution of NHWC `inputs` with a (kh, kw, 1, C * m) `kernel`."""
  implementation = resolve_implementation(implementation)
  return depthwise_conv_xla(inputs, kernel, tuple(strides), padding)
