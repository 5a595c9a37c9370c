"""A depthwise layer and the 1x1 products around it as one inference kernel.

`separable_inference` computes

    y = (out_act(depthwise(in_act(e(x) * a + b)) * a2 + b2) @ w) * scale + bias + residual

i.e. `depthwise.depthwise_conv_inference` followed by a linear
`pointwise.pointwise_inference`, where e(x) is x, an inverted residual block's
expansion x @ expand_kernel, or the network's stem, the convolution of the
images x with stem_kernel; without w, the depthwise output. On the C++ kernel
(`depthwise_cpu.cc`'s `SeparableInference`) each band of the depthwise layer's
input rows is computed by e into a per-thread buffer, and each band of its
output rows goes from a per-thread buffer straight into the projection's
register tiles, so neither the expanded channels (or the stem's output) nor the
depthwise output (a V1 block's input to its pointwise layer) go to memory and
back. models/fused_inference.py uses it for V1's separable blocks where the
product runs on the C++ kernel anyway, and for every inverted residual block:
with its expansion where the map is larger than the filter, and without the
projection where squeeze-and-excitation's gate needs the whole depthwise output
first; and with the stem for the first block.
Elsewhere, and for gradients, it is the operations in turn, which are its
definition (tests/test_fused_inference.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mobilenet.ops import batch_norm, convolution, depthwise, pointwise
from mobilenet.ops.cpu import calls
from mobilenet.ops.cpu import kernels as cpu_kernels


def separable_inference(inputs, depthwise_kernel, pointwise_kernel=None, *, input_affine,
                        output_affine, input_activation, output_activation, scale=None, bias=None,
                        residual=None, expand_kernel=None, stem_kernel=None,
                        stem_strides: int = 1, residual_from_input: bool = False,
                        with_mean: bool = False, strides=(1, 1),
                        padding: depthwise.Padding = 'SAME'):
  """The depthwise inference layer, then `(. @ pointwise_kernel) * scale + bias + residual`.

  `inputs` NHWC, `depthwise_kernel` (k, k, 1, C), `input_affine` / `output_affine`
  and the two activations as `depthwise.depthwise_conv_inference` takes them;
  `pointwise_kernel` (C, D), `scale` and `bias` (D,), `residual` (N, OH, OW, D) or
  None. `pointwise_kernel` None returns the depthwise layer's output. With
  `expand_kernel` (c, C), `inputs` is an inverted residual block's input
  (N, H, W, c) and the depthwise layer's input is `inputs @ expand_kernel`, to
  which `input_affine` and `input_activation` (the expansion's BatchNorm) apply.
  With `stem_kernel` (k, k, c, C), `inputs` are the images (N, H0, W0, c) and the
  depthwise layer's input is their 'SAME' convolution with it at `stem_strides`
  (`convolution.conv`), to which `input_affine` and `input_activation` (the
  stem's BatchNorm) apply. `residual_from_input` adds the depthwise layer's
  input (after `input_affine` and `input_activation`) as the residual: V3-Large's
  first block, whose input the stem computes (stride 1, as many outputs as
  channels). `with_mean` (without `pointwise_kernel`) returns `(y, mean)`, mean
  (N, C) y's mean over each image's positions: squeeze-and-excitation's pooling,
  summed by the kernel from each band of y as it writes it. float32.
  """
  kh, kw, _, channels = depthwise_kernel.shape
  stem = None  # The stem's strides, explicit padding and output size.
  if stem_kernel is not None:
    stem_pads = depthwise.explicit_padding(inputs.shape[1:3], stem_kernel.shape[:2],
                                           (stem_strides, stem_strides), 'SAME')
    stem = (stem_strides, stem_pads,
            tuple(depthwise.output_size(size, k, stem_strides, pad)
                  for size, k, pad in zip(inputs.shape[1:3], stem_kernel.shape[:2], stem_pads)))
  depthwise_input = inputs.shape[1:3] if stem is None else stem[2]
  pads = depthwise.explicit_padding(depthwise_input, (kh, kw), strides, padding)
  f32 = lambda value: None if value is None else jnp.asarray(value, jnp.float32)
  operands = (f32(inputs), f32(depthwise_kernel), *map(f32, input_affine),
              *map(f32, output_affine), f32(pointwise_kernel), f32(scale), f32(bias),
              f32(residual), f32(expand_kernel), f32(stem_kernel))
  settings = (tuple(strides), padding, pads, input_activation, output_activation, stem,
              residual_from_input, with_mean)
  block_input = (channels if expand_kernel is None and stem_kernel is None
                 else (expand_kernel if stem_kernel is None else stem_kernel).shape[-2])
  on_kernel = (cpu_kernels.available() and kh == kw and kh in (3, 5)
               and inputs.shape[-1] == block_input and channels % 8 == 0
               and (expand_kernel is None or stem_kernel is None)
               and (expand_kernel is None or expand_kernel.shape[-1] == channels)
               and (stem_kernel is None or stem_kernel.shape[-1] == channels)
               and (pointwise_kernel is None or pointwise_kernel.shape[-1] % 8 == 0)
               and (pointwise_kernel is not None or residual is None)
               and (pointwise_kernel is None or not with_mean)
               and (not residual_from_input
                    or (stem_kernel is not None and residual is None and tuple(strides) == (1, 1)
                        and pointwise_kernel is not None and pointwise_kernel.shape[-1] == channels))
               and min(pads[0] + pads[1]) >= 0
               and {input_activation, output_activation} <= set(batch_norm.KERNEL_ACTIVATIONS))
  if on_kernel:
    return _separable_kernel(*operands, settings)
  return _separable_xla(*operands, settings)


def _separable_xla(inputs, kernel, in_scale, in_bias, out_scale, out_bias, pointwise_kernel,
                   scale, bias, residual, expand_kernel, stem_kernel, settings):
  """The definition: the operations in turn (and the VJP)."""
  (strides, padding, _, input_activation, output_activation, stem, residual_from_input,
   with_mean) = settings
  if expand_kernel is not None:
    inputs = pointwise.pointwise_conv_xla(inputs, expand_kernel)
  if stem_kernel is not None:
    inputs = convolution.conv_xla(inputs, stem_kernel, stem[0])
  if residual_from_input:
    residual = input_activation(inputs * in_scale + in_bias)
  y = depthwise.depthwise_conv_inference(
      inputs, kernel, input_affine=(in_scale, in_bias), output_affine=(out_scale, out_bias),
      input_activation=input_activation, output_activation=output_activation, strides=strides,
      padding=padding)
  if pointwise_kernel is None:
    return (y, jnp.mean(y, axis=(1, 2))) if with_mean else y
  return pointwise.pointwise_inference(y, pointwise_kernel, scale=scale, bias=bias,
                                       activation=batch_norm.identity, residual=residual)


@functools.partial(jax.custom_vjp, nondiff_argnums=(12,))
def _separable_kernel(inputs, kernel, in_scale, in_bias, out_scale, out_bias, pointwise_kernel,
                      scale, bias, residual, expand_kernel, stem_kernel, settings):
  (strides, _, pads, input_activation, output_activation, stem, residual_from_input,
   with_mean) = settings
  kh, kw, _, channels = kernel.shape
  height, width = inputs.shape[1:3] if stem is None else stem[2]
  out_h = depthwise.output_size(height, kh, strides[0], pads[0])
  out_w = depthwise.output_size(width, kw, strides[1], pads[1])
  out_channels = channels if pointwise_kernel is None else pointwise_kernel.shape[-1]
  out_shape = (inputs.shape[0], out_h, out_w, out_channels)
  empty = jnp.zeros((0,), jnp.float32)  # An operand left out.
  given = lambda value: empty if value is None else value
  mean_shape = (inputs.shape[0], channels if with_mean else 0)
  out, mean = calls.kernel_call(
      'mobilenet_separable_inference', [jax.ShapeDtypeStruct(out_shape, jnp.float32),
                                        jax.ShapeDtypeStruct(mean_shape, jnp.float32)],
      [inputs, kernel.reshape(kh, kw, channels), in_scale, in_bias, out_scale, out_bias,
       given(pointwise_kernel), given(scale), given(bias), given(residual), given(expand_kernel),
       given(stem_kernel)],
      batched=(True,) + (False,) * 8 + (residual is not None, False, False),
      **depthwise.strided_attributes(strides, pads),
      **depthwise.activation_attributes('in', input_activation),
      **depthwise.activation_attributes('out', output_activation),
      **_stem_attributes(stem), residual_from_input=np.int64(residual_from_input))
  return (out, mean) if with_mean else out


def _stem_attributes(stem):
  """The stem's strides, low padding and output size as the kernel's attributes (zeros: none)."""
  strides, pads, (out_h, out_w) = stem if stem is not None else (0, ((0, 0), (0, 0)), (0, 0))
  return {'stem_sh': np.int64(strides), 'stem_sw': np.int64(strides),
          'stem_pt': np.int64(pads[0][0]), 'stem_pl': np.int64(pads[1][0]),
          'stem_oh': np.int64(out_h), 'stem_ow': np.int64(out_w)}


def _separable_kernel_fwd(*args):
  return _separable_kernel(*args), args[:-1]


def _separable_kernel_bwd(settings, residuals, g):
  # Gradients of a fused inference graph are rare (attribution): the definition's.
  _, vjp = jax.vjp(lambda *args: _separable_xla(*args, settings), *residuals)
  return vjp(g)


_separable_kernel.defvjp(_separable_kernel_fwd, _separable_kernel_bwd)
