"""An explicit inference transformation: MobileNetV1 with its BatchNorms fused into the depthwise kernel.

In inference mode BatchNorm + activation is a per-channel affine map and a
clip, clip(x * a + b, lo, hi). In a plan made of a conv stem and
depthwise-separable blocks (MobileNetV1) every one of them sits next to a
depthwise layer: the stem's and each pointwise layer's right before the next
depthwise layer, each depthwise layer's own right after it. The C++ depthwise
kernel applies the first as it reads its input and the second as it writes
its output (`depthwise.depthwise_conv_inference`), so of the 27 BatchNorm
passes over memory of the layer-by-layer network only the last remains,
fused by XLA with the global average pool. (Folding `a` into the kernels
instead would cost a pass over every weight per step.)

`inference_fn(model)` returns a function `(variables, images) -> logits`
computing `model.apply(variables, images, train=False)` this way, or None when
the model is not one it computes: any stage other than the stem and
depthwise-separable blocks (residuals, expansions, SE), an activation other
than ReLU/ReLU6, bfloat16, the 'plain' ops, or depthwise layers not on the
C++ kernels. Nothing calls it implicitly: the trainer and evaluation use it
only when `config.model.fused_inference` is set and it accepts the model, and
log which path they use. tests/test_fused_inference.py checks it against the
layer-by-layer model.
"""
from typing import Callable, Optional

import jax.numpy as jnp

from mobilenet.models.mobilenet import MobileNet
from mobilenet.ops import batch_norm, convolution, depthwise

_BOUNDS = {'relu': (0.0, float('inf')), 'relu6': (0.0, 6.0)}


def unsupported_reason(model: MobileNet) -> Optional[str]:
  """Why `inference_fn` cannot compute `model`, or None when it can."""
  stages = model.plan.stages
  if stages[0].kind != 'conv' or any(stage.kind != 'separable' for stage in stages[1:]):
    return f'{model.plan.architecture} has blocks other than depthwise-separable ones'
  if model.plan.pre_logits_channels:
    return 'the model has a pre-logits layer'
  if len({stage.activation for stage in stages}) != 1 or stages[0].activation not in _BOUNDS:
    return 'the fused kernel computes one activation, ReLU or ReLU6, for every layer'
  if model.dtype != jnp.float32:
    return 'the fused kernel computes in float32'
  if model.ops != 'fast' or depthwise.resolve_implementation(
      model.depthwise_implementation) != 'cpu_kernel':
    return 'the depthwise layers do not run on the C++ CPU kernels'
  return None


def inference_fn(model: MobileNet) -> Optional[Callable]:
  """`(variables, images) -> logits` in inference mode with the BatchNorms fused, or None."""
  if unsupported_reason(model) is not None:
    return None

  def forward(variables, images: jnp.ndarray) -> jnp.ndarray:
    params, stats = variables['params'], variables['batch_stats']
    bounds = _BOUNDS[model.plan.stages[0].activation]

    def affine(layer, norm):
      return batch_norm.inference_affine(params[layer][norm], stats[layer][norm],
                                         model.batch_norm_epsilon)

    stem, *blocks = model.plan.stages
    x = convolution.conv(images.astype(jnp.float32), params['stem']['conv']['kernel'],
                         strides=stem.stride)
    pending = affine('stem', 'bn')  # Not yet applied to x.
    for block in blocks:
      x = depthwise.depthwise_conv_inference(
          x, params[block.name]['depthwise']['kernel'], input_affine=pending,
          output_affine=affine(block.name, 'depthwise_bn'), bounds=bounds,
          strides=(block.stride, block.stride))
      x = jnp.einsum('nhwc,cd->nhwd', x, params[block.name]['pointwise']['kernel'][0, 0])
      pending = affine(block.name, 'pointwise_bn')
    scale, bias = pending
    x = jnp.mean(jnp.clip(x * scale + bias, *bounds), axis=(1, 2))
    return x @ params['head']['kernel'] + params['head']['bias']

  return forward


def eval_apply(model: MobileNet, fused: bool) -> tuple[Callable, str]:
  """The function evaluation computes logits with, and a line saying which one it is.

  With `fused` (config.model.fused_inference) the fused transformation where it
  accepts the model, else the model itself, layer by layer.
  """
  reason = unsupported_reason(model) if fused else 'config.model.fused_inference is off'
  if reason is None:
    return inference_fn(model), 'eval: BatchNorms fused into the C++ depthwise kernel'
  return (lambda variables, images: model.apply(variables, images, train=False),
          f'eval: layer by layer ({reason})')
