"""MobileNetV1 inference with the BatchNorms fused into the depthwise kernel (CPU).

In inference mode BatchNorm + activation is a per-channel affine map and a
clip, clip(x * a + b, lo, hi). Every one of them in MobileNetV1 sits next to
a depthwise layer: the stem's and each pointwise layer's right before the
next depthwise layer, each depthwise layer's own right after it. The C++
depthwise kernel applies the first as it reads its input and the second as
it writes its output (`depthwise.depthwise_conv_inference`), so of the 27
BatchNorm passes over memory of the layer-by-layer network only the last
remains, fused by XLA with the global average pool. (Folding `a` into the
kernels instead would cost a pass over every weight per step.) The function
is the module's own up to float32 rounding (tests/test_inference.py compares
them).

`MobileNetV1` takes this path by itself in inference mode when `supported`
says it applies (`config.model.fused_inference`, on by default): the
separable network in float32 with ReLU or ReLU6 whose depthwise layers run
on the C++ kernels. Anything else runs layer by layer.
"""
import jax.numpy as jnp

from mobilenet.models import architectures as architecture
from mobilenet.ops import batch_norm
from mobilenet.ops import convolution
from mobilenet.ops import depthwise


def supported(model) -> bool:
  """Whether `forward` computes `model` (a MobileNetV1) in inference mode."""
  return (model.conv_type == 'separable' and model.dtype == jnp.float32
          and model.activation in ('relu', 'relu6')
          and depthwise.resolve_implementation(model.depthwise_implementation) == 'cpu_kernel')


def _bounds(activation: str):
  return {'relu': (0.0, float('inf')), 'relu6': (0.0, 6.0)}[activation]


def forward(model, variables, images: jnp.ndarray) -> jnp.ndarray:
  """`model`'s float32 logits for `images` in inference mode, BatchNorms fused."""
  params, stats = variables['params'], variables['batch_stats']
  bounds = _bounds(model.activation)

  def affine(layer, norm):
    return batch_norm.inference_affine(params[layer][norm], stats[layer][norm],
                                       model.batch_norm_epsilon)

  x = convolution.conv(images.astype(jnp.float32), params['stem']['conv']['kernel'],
                       strides=architecture.STEM_STRIDES[model.form])
  pending = affine('stem', 'bn')  # Not yet applied to x.
  for index, stride in enumerate(architecture.BLOCK_STRIDES, start=1):
    block = architecture.block_name(index)
    x = depthwise.depthwise_conv_inference(
        x, params[block]['depthwise']['kernel'], input_affine=pending,
        output_affine=affine(block, 'depthwise_bn'), bounds=bounds, strides=(stride, stride))
    x = jnp.einsum('nhwc,cd->nhwd', x, params[block]['pointwise']['kernel'][0, 0])
    pending = affine(block, 'pointwise_bn')
  scale, bias = pending
  x = jnp.mean(jnp.clip(x * scale + bias, *bounds), axis=(1, 2))
  return x @ params['head']['kernel'] + params['head']['bias']
