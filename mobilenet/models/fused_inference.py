"""An explicit inference transformation: the MobileNet family with its BatchNorms fused into the C++ kernels.

In inference mode BatchNorm + activation is a per-channel affine map and an
activation, act(x * a + b). In every architecture of the family most of them
sit next to a depthwise layer: the stem's, a V1 pointwise layer's or a V2/V3
expansion's right before the next depthwise layer, each depthwise layer's own
right after it. The C++ depthwise kernel applies the first as it reads its
input and the second as it writes its output
(`depthwise.depthwise_conv_inference`), so neither costs a pass over memory.
The rest sit after a 1x1 product: the projection's BatchNorm (linear) with the
residual add, the last 1x1 convolution's, and the dense layers' biases and
activations (squeeze-and-excitation's, pre-logits, classifier). The C++
pointwise kernel applies them as it stores the product
(`pointwise.pointwise_inference`), and squeeze-and-excitation's gate as it
reads the projection's input, so of MobileNetV1's 27 BatchNorm passes only the
last remains (fused by XLA with the global average pool) and an inverted
residual block makes none. The 1x1 products themselves run on that kernel too:
XLA's are up to 3x slower for these small matrices (docs/performance.md, tenth
round). (Folding `a` into the kernels instead would cost a pass over every
weight per step.) Where a depthwise layer feeds a 1x1 product directly (V1's
blocks up to 256 channels on maps of 28x28 and up, and its first block; every
inverted residual block without squeeze-and-excitation), one kernel computes both
(`separable.separable_inference`): the depthwise output goes into the product
band by band while in cache, never to memory (docs/performance.md, twelfth
round). The same kernel computes an inverted residual block's expansion band by
band into the depthwise layer's input, where the map is larger than the filter,
so the expanded channels never go to memory either (fourteenth round), and the
network's stem into the first block's; without the projection (squeeze-and-
excitation blocks) it sums the gate's pooling as it writes the depthwise output
(fifteenth round).

`inference_fn(model)` returns a function `(variables, images) -> logits`
computing `model.apply(variables, images, train=False)` this way, or None when
the model is not one it computes: Conv MobileNet's standard 3x3 blocks,
bfloat16, the 'plain' ops, or depthwise layers not on the C++ kernels. Nothing
calls it implicitly: the trainer and evaluation use it only when
`config.model.fused_inference` is set and it accepts the model, and log which
path they use. tests/test_fused_inference.py checks it against the
layer-by-layer model for every architecture, and each kernel against its
definition; tests/test_keras_reference.py checks it against Keras.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mobilenet.models import architectures, blocks
from mobilenet.models.mobilenet import MobileNet
from mobilenet.ops import batch_norm, convolution, depthwise, pointwise, separable


def unsupported_reason(model: MobileNet) -> Optional[str]:
  """Why `inference_fn` cannot compute `model`, or None when it can."""
  stem, *rest = model.plan.stages
  if stem.kind != 'conv' or any(stage.kind == 'conv' and stage.name != 'last' for stage in rest):
    return f'{model.plan.architecture} has standard convolution blocks (Conv MobileNet)'
  if model.dtype != jnp.float32:
    return 'the fused kernel computes in float32'
  if model.ops != 'fast' or depthwise.resolve_implementation(
      model.depthwise_implementation) != 'cpu_kernel':
    return 'the depthwise layers do not run on the C++ CPU kernels'
  return None


class _Pending:
  """A layer's raw output with its BatchNorm + activation not yet applied: act(raw * a + b).

  `norm` names that BatchNorm ('block_03/expand_bn'), for the operations that apply it alone.
  """

  def __init__(self, raw, affine, activation, norm):
    self.raw, self.affine, self.activation, self.norm = raw, affine, activation, norm

  def value(self):
    """The activations, materialized (by the C++ BatchNorm kernel)."""
    with jax.named_scope(self.norm):
      return batch_norm.inference_apply(self.raw, *self.affine, self.activation)

  def as_xla(self):
    """The activations as XLA operations, which XLA fuses into the reduction that reads them."""
    return self.activation(self.raw * self.affine[0] + self.affine[1])


class _PendingStem(_Pending):
  """The stem's output, pending its BatchNorm + activation, not yet computed: the first block's
  depthwise kernel can compute it band by band itself (`stem_kernel` of ops/separable.py), so it
  never goes to memory; any other reader computes it here (`raw`), once."""

  def __init__(self, images, kernel, strides: int, affine, activation):
    super().__init__(None, affine, activation, 'stem/bn')
    self.images, self.kernel, self.strides = images, kernel, strides

  @property
  def computed(self) -> bool:
    return self._raw is not None

  @property
  def raw(self):
    if self._raw is None:
      with jax.named_scope('stem/conv'):
        self._raw = convolution.conv(self.images, self.kernel, strides=self.strides)
    return self._raw

  @raw.setter
  def raw(self, value):
    self._raw = value


def _stem_in_kernel(x) -> bool:
  """Whether x is the stem's output, not yet computed: the next depthwise kernel computes it."""
  return isinstance(x, _PendingStem) and not x.computed


def inference_fn(model: MobileNet, separable: bool = True, expansion: bool = True,
                 stem: bool = True, pooling: bool = True) -> Optional[Callable]:
  """`(variables, images) -> logits` in inference mode with the BatchNorms fused, or None.

  `separable=False` keeps every depthwise layer and 1x1 product a kernel call of its own,
  `expansion=False` every expansion, `stem=False` the stem, `pooling=False` squeeze-and-
  excitation's pooling (to measure what the one-kernel forms bring: bench/eval_paths.py).
  """
  if unsupported_reason(model) is not None:
    return None

  # Each operation is named after the layer it computes (its op_name in the compiled program,
  # as the model's own modules name theirs), so that a profile gives it to its kind of layer
  # (bench/step_profile.py): '<block>/<layer>', '<block>/<layer>_bn' for a BatchNorm's folding.
  def forward(variables, images: jnp.ndarray) -> jnp.ndarray:
    params, stats = variables['params'], variables['batch_stats']

    def affine(layer, norm):
      with jax.named_scope(f'{layer}/{norm}'):
        return batch_norm.inference_affine(params[layer][norm], stats[layer][norm],
                                           model.batch_norm_epsilon)

    first, *stages = model.plan.stages
    x = _PendingStem(images.astype(jnp.float32), params['stem']['conv']['kernel'], first.stride,
                     affine('stem', 'bn'), blocks.ACTIVATIONS[first.activation])
    if not (separable and stem):  # The stem a kernel call of its own, before the first block.
      x = _Pending(x.raw, x.affine, x.activation, x.norm)
    for stage in stages:
      if stage.kind == 'separable':
        x = _separable(stage, x, params, affine, separable)
      elif stage.kind == 'inverted_residual':
        x = _inverted_residual(stage, x, params, affine, separable, expansion, pooling)
      else:  # The last 1x1 convolution (V2, V3), its BatchNorm + activation in the product's pass.
        scale, bias = affine(stage.name, 'bn')
        inputs = _value(x)
        with jax.named_scope(f'{stage.name}/conv'):
          x = pointwise.pointwise_inference(inputs, _kernel(params, stage.name, 'conv'),
                                            scale=scale, bias=bias,
                                            activation=blocks.ACTIVATIONS[stage.activation])
    # V1's last BatchNorm on the C++ kernel: left to XLA, it fuses it and the pooling into the
    # classifier's dot, where they took 4 ms (cifar form, alpha 1.0) instead of 0.1.
    x = jnp.mean(_value(x), axis=(1, 2))
    if model.plan.pre_logits_channels:
      with jax.named_scope('pre_logits'):
        x = _dense(x, params['pre_logits'], blocks.ACTIVATIONS[model.plan.pre_logits_activation])
    with jax.named_scope('head'):
      return _dense(x, params['head'], batch_norm.identity)

  return forward


def _value(x):
  return x.value() if isinstance(x, _Pending) else x


def _kernel(params, layer: str, conv: str) -> jnp.ndarray:
  """A 1x1 convolution's kernel as the (C, D) matrix it multiplies by."""
  return params[layer][conv]['kernel'][0, 0]


def _product(x, kernel) -> jnp.ndarray:
  """x @ kernel alone, its BatchNorm + activation left pending for the next depthwise kernel."""
  return pointwise.matrix_product(x, kernel)


def _dense(x, dense, activation) -> jnp.ndarray:
  """activation(x @ kernel + bias) for a Dense layer's parameters."""
  kernel = dense['kernel']
  return pointwise.pointwise_inference(x, kernel, scale=jnp.ones(kernel.shape[-1], jnp.float32),
                                       bias=dense['bias'], activation=activation)


def _identity_pending(x) -> _Pending:
  channels = x.shape[-1]
  ones, zeros = jnp.ones(channels, jnp.float32), jnp.zeros(channels, jnp.float32)
  return _Pending(x, (ones, zeros), batch_norm.identity, 'identity')


def _depthwise(stage: architectures.Stage, x: _Pending, params, affine) -> jnp.ndarray:
  """The stage's depthwise layer with x's pending map before it and its own BatchNorm after it."""
  output_affine = affine(stage.name, 'depthwise_bn')
  with jax.named_scope(f'{stage.name}/depthwise'):
    return depthwise.depthwise_conv_inference(
        x.raw, params[stage.name]['depthwise']['kernel'], input_affine=x.affine,
        output_affine=output_affine, input_activation=x.activation,
        output_activation=blocks.ACTIVATIONS[stage.activation],
        strides=(stage.stride, stage.stride))


def _depthwise_then_product(stage, x: _Pending, params, affine, product: Optional[str], scale=None,
                            bias=None, residual=None, expand=None,
                            residual_from_input: bool = False, with_mean: bool = False):
  """The stage's depthwise layer and `(. @ product kernel) * scale + bias + residual` in one
  kernel: the depthwise output rows go into the product while in cache (ops/separable.py). With
  `expand` (the expansion's kernel; x pending the expansion's BatchNorm on the block input) the
  expansion too; with x the stem's output not yet computed (_PendingStem), the stem (and with
  `residual_from_input` its activated output as the residual); without `product`, the depthwise
  output (and with `with_mean`, its mean over each image too: `(y, mean)`)."""
  output_affine = affine(stage.name, 'depthwise_bn')
  stem = _stem_in_kernel(x)
  layers = '_'.join(['expand'] * (expand is not None) + ['stem'] * stem + ['depthwise']
                    + [product] * bool(product))
  with jax.named_scope(f'{stage.name}/{layers}'):
    return separable.separable_inference(
        x.images if stem else x.raw, params[stage.name]['depthwise']['kernel'],
        None if product is None else _kernel(params, stage.name, product),
        input_affine=x.affine, output_affine=output_affine, input_activation=x.activation,
        output_activation=blocks.ACTIVATIONS[stage.activation], scale=scale, bias=bias,
        residual=residual, expand_kernel=expand, stem_kernel=x.kernel if stem else None,
        stem_strides=x.strides if stem else 1, residual_from_input=residual_from_input,
        with_mean=with_mean, strides=(stage.stride, stage.stride))


# A V1 block's depthwise layer and product in one kernel pay where each image's output map is
# large (28x28 and up: 1.01-1.07x faster than two kernels at 224); on smaller maps (the 32x32
# form's after the first block, 224's from 14x14) two kernels were 2-7% faster, paired
# (docs/performance.md, fifteenth round).
_V1_ONE_KERNEL_MIN_POSITIONS = 28 * 28


def _v1_one_kernel_pays(stage, x: _Pending, kernel) -> bool:
  """Whether V1's block computes its depthwise layer and product in one kernel (the stem too,
  in the first block, which saves the stem's pass over memory whatever the map)."""
  if not pointwise.kernel_product_pays(*kernel.shape):  # 512+ channels: XLA's dot is faster.
    return False
  if _stem_in_kernel(x):
    return True
  height, width = x.raw.shape[1:3]
  positions = -(-height // stage.stride) * -(-width // stage.stride)
  return positions >= _V1_ONE_KERNEL_MIN_POSITIONS


def _separable(stage, x, params, affine, one_kernel: bool) -> _Pending:
  if not isinstance(x, _Pending):
    x = _identity_pending(x)
  kernel = _kernel(params, stage.name, 'pointwise')
  if one_kernel and _v1_one_kernel_pays(stage, x, kernel):
    channels = kernel.shape[-1]
    y = _depthwise_then_product(stage, x, params, affine, 'pointwise',
                                jnp.ones(channels, jnp.float32), jnp.zeros(channels, jnp.float32))
  else:
    y = _depthwise(stage, x, params, affine)
    with jax.named_scope(f'{stage.name}/pointwise'):
      y = _product(y, kernel)
  return _Pending(y, affine(stage.name, 'pointwise_bn'), blocks.ACTIVATIONS[stage.activation],
                  f'{stage.name}/pointwise_bn')


def _squeeze_excite_gate(s, se, name: str) -> jnp.ndarray:
  """blocks.SqueezeExcite's multiplier (N, C) of the depthwise output's channels from its mean
  over each image `s` (N, C), which the projection applies."""
  with jax.named_scope(f'{name}/se/squeeze'):
    s = _dense(s, se['squeeze'], blocks.ACTIVATIONS['relu'])
  with jax.named_scope(f'{name}/se/excite'):
    return _dense(s, se['excite'], jax.nn.hard_sigmoid)


def _expansion_fuses(stage, inputs, kernel) -> bool:
  """Whether the depthwise kernel computes the expansion band by band: where its product runs on
  the C++ kernel anyway, over maps larger than the filter (on those no larger, a few rows per
  image, the product's register tiles would read the whole kernel for every row or two)."""
  return (pointwise.kernel_product_pays(*kernel.shape)
          and max(inputs.shape[1:3]) > stage.kernel_size)


def _inverted_residual(stage, x, params, affine, one_kernel: bool, expansion: bool,
                       pooling: bool) -> jnp.ndarray:
  scale, bias = affine(stage.name, 'project_bn')
  if (_stem_in_kernel(x) and stage.residual and not stage.expanded_channels
      and not stage.se_channels):
    # V3-Large's first block: the stem inside its kernel, whose output (the block's input) the
    # kernel adds back from its own band rows, so it never goes to memory either.
    return _depthwise_then_product(stage, x, params, affine, 'project', scale, bias,
                                   residual_from_input=True)
  if stage.residual or stage.expanded_channels or not isinstance(x, _Pending):
    inputs = _value(x)  # Read again by the expansion or the residual add: materialized once.
    x = _identity_pending(inputs)
  expand = None
  if stage.expanded_channels:
    kernel = _kernel(params, stage.name, 'expand')
    expand_bn = (affine(stage.name, 'expand_bn'), blocks.ACTIVATIONS[stage.activation],
                 f'{stage.name}/expand_bn')
    if one_kernel and expansion and _expansion_fuses(stage, inputs, kernel):
      expand, x = kernel, _Pending(inputs, *expand_bn)  # Expanded inside the depthwise kernel.
    else:
      with jax.named_scope(f'{stage.name}/expand'):
        x = _Pending(_product(inputs, kernel), *expand_bn)
  residual = inputs if stage.residual else None
  if one_kernel and not stage.se_channels:  # Linear bottleneck: no activation, the input added back.
    return _depthwise_then_product(stage, x, params, affine, 'project', scale, bias, residual,
                                   expand)
  # Squeeze-and-excitation's gate needs the whole depthwise output first: the projection is a pass
  # of its own, with the gate on its input. The kernel that writes the depthwise output sums its
  # mean for the gate, band by band from cache.
  if one_kernel:  # A block with squeeze-and-excitation (the others returned above).
    y, mean = _depthwise_then_product(stage, x, params, affine, None, expand=expand,
                                      with_mean=True)
  else:
    y, mean = _depthwise(stage, x, params, affine), None
  gate = None
  if stage.se_channels:
    if mean is None or not pooling:
      with jax.named_scope(f'{stage.name}/se'):
        mean = jnp.mean(y, axis=(1, 2))
    gate = _squeeze_excite_gate(mean, params[stage.name]['se'], stage.name)
  with jax.named_scope(f'{stage.name}/project'):
    return pointwise.pointwise_inference(y, _kernel(params, stage.name, 'project'), scale=scale,
                                         bias=bias, activation=batch_norm.identity,
                                         residual=residual, gate=gate)


def eval_apply(model: MobileNet, fused: bool) -> tuple[Callable, str]:
  """The function evaluation computes logits with, and a line saying which one it is.

  With `fused` (config.model.fused_inference) the fused transformation where it
  accepts the model, else the model itself, layer by layer.
  """
  reason = unsupported_reason(model) if fused else 'config.model.fused_inference is off'
  if reason is None:
    return inference_fn(model), 'eval: BatchNorms fused into the C++ depthwise and pointwise kernels'
  return (lambda variables, images: model.apply(variables, images, train=False),
          f'eval: layer by layer ({reason})')
