"""Depthwise convolution implementations (functional, no parameters).

Every implementation computes the same function as XLA's grouped convolution
with `feature_group_count` = input channels: NHWC `inputs`, a
(kh, kw, 1, C * multiplier) `kernel`, and output channel `c * multiplier + j`
computed from input channel `c`. ops/select.py says which one 'auto' is.

- 'xla': `lax.conv_general_dilated` with `feature_group_count`. Fastest on
  GPU (cuDNN; measured on an H200) and TPU. On CPU it is ~100x slower than
  needed, and its autodiff computes the filter gradient as a dense C x C
  convolution (C times the needed work).
- 'shifted': kh * kw shifted (and, for stride 2, strided) slices multiplied by
  one filter tap each and summed, with a hand-written VJP: the input gradient
  is again kh * kw shifted multiply-adds (one per output phase for strides > 1,
  so no multiply touches an inserted zero) and the filter gradient is kh * kw
  products reduced over N, H, W. XLA fuses each of the three into loops over
  the activations, so the work is the minimal 2 * kh * kw flops per element.
"""
import functools
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mobilenet.ops import batch_norm, select
from mobilenet.ops.cpu import calls
from mobilenet.ops.cpu import kernels as cpu_kernels

Padding = Union[str, Sequence[Tuple[int, int]]]

IMPLEMENTATIONS = select.IMPLEMENTATIONS['depthwise']


def depthwise_conv_xla(inputs, kernel, strides, padding):
  """XLA grouped convolution: NHWC inputs, kernel (kh, kw, 1, C * multiplier)."""
  return lax.conv_general_dilated(
      inputs, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=inputs.shape[-1])


def explicit_padding(spatial_shape, window_shape, strides, padding: Padding):
  """Returns ((lo, hi), (lo, hi)) for 'SAME', 'VALID' or explicit pairs."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(spatial_shape, window_shape, strides, padding.upper()))
  return tuple(tuple(int(p) for p in pair) for pair in padding)


def _accumulation_dtype(dtype):
  """Low-precision floats accumulate in float32 (inside the fused loop, so no extra memory)."""
  return jnp.promote_types(dtype, jnp.float32)


def _tap(padded, dy, dx, out_h, out_w, strides):
  """The (out_h, out_w) window of `padded` that filter tap (dy, dx) multiplies."""
  sh, sw = strides
  return lax.slice(
      padded, (0, dy, dx, 0),
      (padded.shape[0], dy + sh * (out_h - 1) + 1, dx + sw * (out_w - 1) + 1, padded.shape[3]),
      (1, sh, sw, 1))


def output_size(size, k, stride, pads):
  return (size + pads[0] + pads[1] - k) // stride + 1


def _shifted_forward(x, w, strides, pads):
  """y[n,i,j,c] = sum_{dy,dx} xpad[n, i*sh+dy, j*sw+dx, c] * w[dy,dx,c]."""
  kh, kw, _ = w.shape
  acc_dtype = _accumulation_dtype(x.dtype)
  out_h = output_size(x.shape[1], kh, strides[0], pads[0])
  out_w = output_size(x.shape[2], kw, strides[1], pads[1])
  padded = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  wa = w.astype(acc_dtype)
  out = None
  for dy in range(kh):
    for dx in range(kw):
      term = _tap(padded, dy, dx, out_h, out_w, strides).astype(acc_dtype) * wa[dy, dx]
      out = term if out is None else out + term
  return out.astype(x.dtype)


def _phase_taps(k, stride, pad_lo, phase):
  """Filter taps d whose outputs land on input rows p = phase (mod stride), and their offsets.

  Input row p (unpadded) is read by output row i through tap d when
  i * stride + d - pad_lo = p. For p = phase + stride * q this gives
  i = q + (phase + pad_lo - d) / stride, an integer offset for the taps returned.
  """
  taps = []
  for d in range(k):
    shift = phase + pad_lo - d
    if shift % stride == 0:
      taps.append((d, shift // stride))
  return taps


def _shifted_input_grad(g, w, in_shape, strides, pads):
  """dL/dx as shifted multiply-adds: one stride-1 correlation per output phase.

  With stride s each input row is touched by only the taps congruent to it mod
  s, so the gradient splits into s_h * s_w phases; each phase is a sum of
  shifted copies of g times one tap, and the phases are interleaved. No
  multiply touches a zero inserted by dilation.
  """
  n, h, wdt, c = in_shape
  kh, kw, _ = w.shape
  sh, sw = strides
  acc_dtype = _accumulation_dtype(g.dtype)
  ga = g.astype(acc_dtype)
  wa = w.astype(acc_dtype)
  out_h, out_w = g.shape[1], g.shape[2]
  zero = jnp.zeros((), acc_dtype)
  phase_rows = []
  for ph in range(sh):
    rows_h = -(-(h - ph) // sh)  # input rows of this phase: ph, ph + sh, ...
    phase_cols = []
    for pw in range(sw):
      rows_w = -(-(wdt - pw) // sw)
      acc = jnp.zeros((n, rows_h, rows_w, c), acc_dtype)
      for dy, oy in _phase_taps(kh, sh, pads[0][0], ph):
        for dx, ox in _phase_taps(kw, sw, pads[1][0], pw):
          # Rows q of this phase read g[q + oy]; pad/crop g so the window starts there.
          window = lax.pad(ga, zero, ((0, 0, 0), (-oy, rows_h + oy - out_h, 0),
                                      (-ox, rows_w + ox - out_w, 0), (0, 0, 0)))
          acc = acc + window * wa[dy, dx]
      phase_cols.append(acc)
    phase_rows.append(phase_cols)
  return _interleave_phases(phase_rows, h, wdt).astype(g.dtype)


def _interleave_phases(phases, h, w):
  """Interleaves phases[ph][pw] (rows ph::sh, cols pw::sw) back into an (N, h, w, C) array."""
  sh, sw = len(phases), len(phases[0])
  if sh == 1 and sw == 1:
    return phases[0][0]
  rows_h, rows_w = -(-h // sh), -(-w // sw)
  # Pad every phase to the largest phase's size so they stack; the extra rows are cropped.
  padded = [[lax.pad(p, jnp.zeros((), p.dtype), ((0, 0, 0), (0, rows_h - p.shape[1], 0),
                                                 (0, rows_w - p.shape[2], 0), (0, 0, 0)))
             for p in row] for row in phases]
  n, c = padded[0][0].shape[0], padded[0][0].shape[3]
  stacked = jnp.stack([jnp.stack(row, axis=3) for row in padded], axis=2)  # n, rh, sh, rw, sw, c
  return stacked.reshape(n, rows_h * sh, rows_w * sw, c)[:, :h, :w, :]


def _shifted_filter_grad(x, g, kernel_shape, strides, pads):
  """dL/dw[dy,dx,c] = sum_{n,i,j} xpad[n, i*sh+dy, j*sw+dx, c] * g[n,i,j,c]."""
  kh, kw, _ = kernel_shape
  acc_dtype = _accumulation_dtype(x.dtype)
  out_h, out_w = g.shape[1], g.shape[2]
  padded = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  ga = g.astype(acc_dtype)
  taps = [jnp.sum(_tap(padded, dy, dx, out_h, out_w, strides).astype(acc_dtype) * ga, axis=(0, 1, 2))
          for dy in range(kh) for dx in range(kw)]
  return jnp.stack(taps).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise(x, w, strides, pads):
  """Multiplier-1 depthwise conv; x (N, H, W, C), w (kh, kw, C)."""
  return _shifted_forward(x, w, strides, pads)


def _shifted_depthwise_fwd(x, w, strides, pads):
  return _shifted_forward(x, w, strides, pads), (x, w)


def _shifted_depthwise_bwd(strides, pads, residuals, g):
  x, w = residuals
  dx = _shifted_input_grad(g, w, x.shape, strides, pads)
  dw = _shifted_filter_grad(x, g, w.shape, strides, pads).astype(w.dtype)
  return dx, dw


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def depthwise_conv_shifted(inputs, kernel, strides, padding):
  """Shifted multiply-adds with a hand-written VJP; same layout as `depthwise_conv_xla`."""
  kh, kw, _, out_channels = kernel.shape
  channels = inputs.shape[-1]
  if out_channels % channels:
    raise ValueError(f'kernel has {out_channels} output channels, not a multiple of {channels} inputs')
  multiplier = out_channels // channels
  if multiplier > 1:
    # Output channel c*m+j reads input channel c: repeat each input channel m times
    # (autodiff sums the m copies' gradients back, a cheap reduction).
    inputs = jnp.repeat(inputs, multiplier, axis=-1)
  pads = explicit_padding(inputs.shape[1:3], (kh, kw), strides, padding)
  return _shifted_depthwise(inputs, kernel.reshape(kh, kw, out_channels), tuple(strides), pads)


def _kernel_call(name, out_shape, first, second, strides, pads):
  """Calls one compiled kernel on float32 operands (the filter gradient reduces over the batch)."""
  return cpu_kernels.call_strided(f'mobilenet_depthwise_{name}', out_shape, first, second,
                                  strides, pads, reduces=name == 'filter_grad')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _kernel_depthwise(x, w, strides, pads):
  """Multiplier-1 depthwise conv on the CPU kernel; x (N, H, W, C) float32, w (kh, kw, C)."""
  out_h = output_size(x.shape[1], w.shape[0], strides[0], pads[0])
  out_w = output_size(x.shape[2], w.shape[1], strides[1], pads[1])
  return _kernel_call('forward', (x.shape[0], out_h, out_w, x.shape[3]), x, w, strides, pads)


def _kernel_depthwise_fwd(x, w, strides, pads):
  return _kernel_depthwise(x, w, strides, pads), (x, w)


def _kernel_depthwise_bwd(strides, pads, residuals, g):
  x, w = residuals
  dx = _kernel_call('input_grad', x.shape, g, w, strides, pads)
  dw = _kernel_call('filter_grad', w.shape, x, g, strides, pads)
  return dx, dw


_kernel_depthwise.defvjp(_kernel_depthwise_fwd, _kernel_depthwise_bwd)


def depthwise_conv_cpu_kernel(inputs, kernel, strides, padding):
  """The C++ CPU kernel with the same layout and semantics as `depthwise_conv_xla`."""
  if not cpu_kernels.available():
    raise RuntimeError("depthwise implementation 'cpu_kernel' is unavailable: "
                       f'{cpu_kernels.error()}')
  kh, kw, _, out_channels = kernel.shape
  multiplier = out_channels // inputs.shape[-1]
  if multiplier > 1:
    inputs = jnp.repeat(inputs, multiplier, axis=-1)  # As in depthwise_conv_shifted.
  pads = explicit_padding(inputs.shape[1:3], (kh, kw), strides, padding)
  out = _kernel_depthwise(inputs.astype(jnp.float32),
                          kernel.reshape(kh, kw, out_channels).astype(jnp.float32),
                          tuple(strides), pads)
  return out.astype(inputs.dtype)


_REGISTRY = {'xla': depthwise_conv_xla, 'shifted': depthwise_conv_shifted,
             'cpu_kernel': depthwise_conv_cpu_kernel}


def resolve_implementation(name: str, backend: str = None) -> str:
  """Maps 'auto' to the fastest implementation measured on `backend` (ops/select.py)."""
  return select.resolve('depthwise', name, backend)


def depthwise_conv(inputs: jnp.ndarray, kernel: jnp.ndarray, *, strides=(1, 1),
                   padding: Padding = 'SAME', implementation: str = 'auto') -> jnp.ndarray:
  """Depthwise convolution of NHWC `inputs` with a (kh, kw, 1, C * m) `kernel`."""
  implementation = resolve_implementation(implementation)
  return _REGISTRY[implementation](inputs, kernel, tuple(strides), padding)


def depthwise_conv_inference(inputs, kernel, *, input_affine, output_affine, input_activation,
                             output_activation, strides=(1, 1), padding: Padding = 'SAME'):
  """Inference-mode BatchNorm + activation on both sides of a depthwise convolution.

  With (a, b) = input_affine, (a2, b2) = output_affine:
  output_activation(depthwise(input_activation(inputs * a + b)) * a2 + b2) in
  float32, i.e. the previous layer's BatchNorm + activation, this layer, and its
  own (models/fused_inference.py). The activations are those of
  `batch_norm.KERNEL_ACTIVATIONS` (ReLU, ReLU6, hard-swish, `batch_norm.identity`).
  For a 3x3 or 5x5 filter over a multiple of 8 channels with multiplier 1 both
  maps run inside the C++ kernel's loops, one pass over memory instead of
  three; otherwise as XLA steps around `depthwise_conv`.
  """
  kh, kw, _, out_channels = kernel.shape
  channels = inputs.shape[-1]
  pads = explicit_padding(inputs.shape[1:3], (kh, kw), strides, padding)
  f32 = lambda value: jnp.asarray(value, jnp.float32)
  operands = (f32(inputs), f32(kernel), *map(f32, input_affine), *map(f32, output_affine))
  settings = (tuple(strides), padding, pads, input_activation, output_activation)
  on_kernel = (cpu_kernels.available() and kh == kw and kh in (3, 5)
               and out_channels == channels and channels % 8 == 0
               and min(pads[0] + pads[1]) >= 0
               and {input_activation, output_activation} <= set(batch_norm.KERNEL_ACTIVATIONS))
  if on_kernel:
    return _fused_inference_kernel(*operands, settings)
  return _inference_xla(*operands, settings)


def _inference_xla(inputs, kernel, in_scale, in_bias, out_scale, out_bias, settings):
  """depthwise_conv_inference as XLA steps around `depthwise_conv`: its reference and VJP."""
  strides, padding, _, input_activation, output_activation = settings
  activated = input_activation(inputs * in_scale + in_bias)
  y = depthwise_conv(activated, kernel, strides=strides, padding=padding)
  return output_activation(y * out_scale + out_bias)


def activation_attributes(prefix, activation):
  kind, lo, hi = batch_norm.KERNEL_ACTIVATIONS[activation]
  return {f'{prefix}_kind': np.int32(kind), f'{prefix}_lo': np.float32(lo),
          f'{prefix}_hi': np.float32(hi)}


def strided_attributes(strides, pads):
  return dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pads[0][0]),
              pl=np.int64(pads[1][0]))


def inference_kernel_call(inputs, kernel, in_scale, in_bias, out_scale, out_bias, *, strides,
                          pads, input_activation, output_activation):
  """The fused C++ kernel's forward pass, per example (sharded and vmappable through calls.py):
  float32 NHWC `inputs`, a (k, k, C) `kernel`, explicit `pads`; no VJP of its own."""
  kh, kw, channels = kernel.shape
  out_h = output_size(inputs.shape[1], kh, strides[0], pads[0])
  out_w = output_size(inputs.shape[2], kw, strides[1], pads[1])
  out, = calls.kernel_call(
      'mobilenet_depthwise_inference',
      [jax.ShapeDtypeStruct((inputs.shape[0], out_h, out_w, channels), jnp.float32)],
      [inputs, kernel, in_scale, in_bias, out_scale, out_bias],
      batched=(True,) + (False,) * 5, **strided_attributes(strides, pads),
      **activation_attributes('in', input_activation),
      **activation_attributes('out', output_activation))
  return out


def input_grad_kernel_call(g, kernel, input_shape, *, strides, pads):
  """The C++ kernel's input gradient: dL/d(inputs) of `input_shape` from dL/d(output) `g`."""
  return _kernel_call('input_grad', input_shape, g, kernel, strides, pads)


def activated_backward_kernel_call(inputs, g, kernel, in_scale, in_bias, mean, *, strides, pads,
                                   input_activation, input_grad: bool = True):
  """The backward pass of depthwise(input_activation(inputs * in_scale + in_bias)) with a
  (k, k, C) `kernel` from dL/d(output) `g`, in one C++ call: (the filter gradient, the gradient
  at the activated input, and BatchNorm's backward sums over it with the batch `mean`: sum_g =
  sum of the gradient at the BatchNorm's output, sum_gx = sum of it times (inputs - mean)), the
  activated input recomputed from `inputs` as it is read. With `input_grad` False, the filter
  gradient alone (what the call computes before its input gradient and sums)."""
  channels = jax.ShapeDtypeStruct(kernel.shape[-1:], jnp.float32)
  none = jax.ShapeDtypeStruct((0,), jnp.float32)
  d_filter, d_activated, sum_g, sum_gx = calls.kernel_call(
      'mobilenet_depthwise_activated_backward',
      [jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
       jax.ShapeDtypeStruct(inputs.shape if input_grad else (inputs.shape[0], 0), jnp.float32),
       channels if input_grad else none, channels if input_grad else none],
      [inputs, g, kernel, in_scale, in_bias, mean],
      batched=(True, True, False, False, False, False), combine=calls.psum_combine,
      reduced=(True, False, True, True), **strided_attributes(strides, pads),
      **activation_attributes('in', input_activation))
  return (d_filter, d_activated, sum_g, sum_gx) if input_grad else d_filter


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused_inference_kernel(inputs, kernel, in_scale, in_bias, out_scale, out_bias, settings):
  """The one-pass C++ kernel, with the XLA form's VJP."""
  strides, _, pads, input_activation, output_activation = settings
  kh, kw, _, channels = kernel.shape
  return inference_kernel_call(inputs, kernel.reshape(kh, kw, channels), in_scale, in_bias,
                               out_scale, out_bias, strides=strides, pads=pads,
                               input_activation=input_activation,
                               output_activation=output_activation)


def _fused_inference_fwd(*args):
  return _fused_inference_kernel(*args), args[:-1]


def _fused_inference_bwd(settings, residuals, g):
  # Gradients of a fused inference graph (attribution, per-example
  # gradients) are rare: the XLA form's VJP, through the fast depthwise VJP.
  _, vjp = jax.vjp(lambda *args: _inference_xla(*args, settings), *residuals)
  return vjp(g)


_fused_inference_kernel.defvjp(_fused_inference_fwd, _fused_inference_bwd)
