"""Exact parameter and mult-add counts for every layer of every variant.

The counts come from the same plan the Flax builder reads
(models/architectures.py): D_K*D_K*M*N weights and D_K*D_K*M*N*D_F^2
mult-adds for a standard convolution, D_K*D_K*M + M*N weights and
(D_K*D_K*M + M*N)*D_F^2 mult-adds for a depthwise-separable one, M*N for a
dense layer (the squeeze-and-excitation and pre-logits layers run on 1x1
maps). As in the papers, mult-adds count the multiplications of convolutions
and dense layers; BatchNorm, activations, the SE scaling, residual additions
and pooling are not counted. Tests check the counts against the parameters
Flax initializes, XLA's cost analysis of each layer, keras.applications'
parameter counts and the papers' tables.
"""
import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from mobilenet.models import architectures
from mobilenet.models.architectures import Plan, same_output_size
from mobilenet.models.mobilenet import model_plan


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer that holds weights: a convolution or a dense layer."""
  name: str  # Parameter path in the Flax model, e.g. 'block_03/depthwise'.
  kind: str  # 'standard', 'depthwise', 'pointwise' or 'dense'.
  kernel_size: int
  stride: int
  in_channels: int
  out_channels: int
  in_size: int  # Input side (square feature maps); 1 for dense layers.
  out_size: int
  bias: bool = False  # Dense layers have a bias; convolutions are followed by BatchNorm ...
  batch_norm: bool = True  # ... which dense layers are not.

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the Flax kernel: HWIO for convolutions, (in, out) for dense."""
    if self.kind == 'dense':
      return (self.in_channels, self.out_channels)
    in_per_group = 1 if self.kind == 'depthwise' else self.in_channels
    return (self.kernel_size, self.kernel_size, in_per_group, self.out_channels)

  @property
  def weights(self) -> int:
    """Kernel entries: D_K * D_K * M * N standard, D_K * D_K * M depthwise, M * N pointwise."""
    return math.prod(self.kernel_shape)

  @property
  def biases(self) -> int:
    return self.out_channels if self.bias else 0

  @property
  def batch_norm_channels(self) -> int:
    """Channels of the BatchNorm after this layer (0 when there is none)."""
    return self.out_channels if self.batch_norm else 0

  @property
  def params(self) -> int:
    """Trainable parameters: weights, biases and the BatchNorm scale and offset."""
    return self.weights + self.biases + 2 * self.batch_norm_channels

  @property
  def mult_adds(self) -> int:
    """Multiply-adds of one forward pass on one example: weights * D_F * D_F."""
    return self.weights * self.out_size * self.out_size


@dataclasses.dataclass(frozen=True)
class Totals:
  """Whole-network counts."""
  params: int  # Trainable: weights, biases, BatchNorm scale and offset.
  batch_stats: int  # BatchNorm running mean and variance (not trained).
  weights: int  # Convolution and dense kernels only.
  mult_adds: int  # Per example, forward pass.

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def _dense(name: str, in_channels: int, out_channels: int) -> LayerSpec:
  return LayerSpec(name, 'dense', 1, 1, in_channels, out_channels, 1, 1, bias=True,
                   batch_norm=False)


def layer_specs(plan: Plan, resolution: int, num_classes: int) -> list[LayerSpec]:
  """Every weight-holding layer of a plan at an input resolution, in order."""
  specs, size = [], resolution
  for stage in plan.stages:
    out_size = same_output_size(size, stage.stride)
    name, k = stage.name, stage.kernel_size
    if stage.kind == 'conv':
      kind = 'pointwise' if k == 1 and stage.stride == 1 else 'standard'
      specs.append(LayerSpec(f'{name}/conv', kind, k, stage.stride, stage.in_channels,
                             stage.out_channels, size, out_size))
    elif stage.kind == 'separable':
      specs.append(LayerSpec(f'{name}/depthwise', 'depthwise', k, stage.stride,
                             stage.in_channels, stage.in_channels, size, out_size))
      specs.append(LayerSpec(f'{name}/pointwise', 'pointwise', 1, 1, stage.in_channels,
                             stage.out_channels, out_size, out_size))
    else:
      channels = stage.expanded_channels or stage.in_channels
      if stage.expanded_channels:
        specs.append(LayerSpec(f'{name}/expand', 'pointwise', 1, 1, stage.in_channels, channels,
                               size, size))
      specs.append(LayerSpec(f'{name}/depthwise', 'depthwise', k, stage.stride, channels,
                             channels, size, out_size))
      if stage.se_channels:
        specs.append(_dense(f'{name}/se/squeeze', channels, stage.se_channels))
        specs.append(_dense(f'{name}/se/excite', stage.se_channels, channels))
      specs.append(LayerSpec(f'{name}/project', 'pointwise', 1, 1, channels, stage.out_channels,
                             out_size, out_size))
    size = out_size
  if plan.pre_logits_channels:
    specs.append(_dense('pre_logits', plan.stages[-1].out_channels, plan.pre_logits_channels))
  specs.append(_dense('head', plan.features, num_classes))
  return specs


def model_layer_specs(config: ml_collections.ConfigDict) -> list[LayerSpec]:
  """The layer table of the model a full experiment config describes."""
  return layer_specs(model_plan(config.model, config.input.channels), config.model.resolution,
                     config.model.num_classes)


def imagenet_specs(name: str = 'mobilenet_v1', *, width_multiplier: float = 1.0,
                   resolution: int = 224, num_classes: int = 1000, **plan_kwargs) -> list[LayerSpec]:
  """The layer table of an ImageNet-form variant (the papers' setting)."""
  plan = architectures.plan(name, width_multiplier=width_multiplier, form='imagenet',
                            **plan_kwargs)
  return layer_specs(plan, resolution, num_classes)


def totals(specs: Sequence[LayerSpec]) -> Totals:
  """Sums the per-layer counts."""
  return Totals(
      params=sum(spec.params for spec in specs),
      batch_stats=sum(2 * spec.batch_norm_channels for spec in specs),
      weights=sum(spec.weights for spec in specs),
      mult_adds=sum(spec.mult_adds for spec in specs))


def format_table(specs: Sequence[LayerSpec]) -> str:
  """A per-layer Markdown table with shares of the totals, then the totals."""
  total = totals(specs)
  header = ('| layer | type | kernel shape | output | params | mult-adds | % params | % mult-adds |\n'
            '|---|---|---|---|---:|---:|---:|---:|')
  rows = [header]
  for spec in specs:
    output = (f'{spec.out_size}x{spec.out_size}x{spec.out_channels}' if spec.kind != 'dense'
              else f'{spec.out_channels}')
    rows.append(
        f'| {spec.name} | {spec.kind} | {"x".join(map(str, spec.kernel_shape))} | {output} '
        f'| {spec.params:,} | {spec.mult_adds:,} | {100 * spec.params / total.params:.1f} '
        f'| {100 * spec.mult_adds / total.mult_adds:.1f} |')
  rows.append(f'| **total** | | | | **{total.params:,}** | **{total.mult_adds:,}** | 100.0 | 100.0 |')
  rows.append('')
  rows.append(f'trainable parameters {total.params:,} (kernels {total.weights:,}, biases and '
              f'BatchNorm scale/offset {total.params - total.weights:,}); BatchNorm statistics '
              f'{total.batch_stats:,}; mult-adds per example {total.mult_adds:,} '
              f'({total.mult_adds / 1e6:.1f} M)')
  return '\n'.join(rows)


def design_notes_example(size: int = 5, in_channels: int = 3, out_channels: int = 4,
                         kernel_size: int = 3) -> dict[str, int]:
  """Weights of one standard vs one depthwise-separable layer (the design notes' example).

  A 3x3 convolution from a 5x5x3 input to 4 maps: 108 weights; depthwise 27 plus
  pointwise 12 = 39.
  """
  standard = LayerSpec('standard', 'standard', kernel_size, 1, in_channels, out_channels, size, size)
  depthwise = LayerSpec('depthwise', 'depthwise', kernel_size, 1, in_channels, in_channels, size,
                        size)
  pointwise = LayerSpec('pointwise', 'pointwise', 1, 1, in_channels, out_channels, size, size)
  return {
      'N_std': standard.weights, 'N_dw': depthwise.weights, 'N_pw': pointwise.weights,
      'N_sep': depthwise.weights + pointwise.weights,
      'mult_adds_std': standard.mult_adds,
      'mult_adds_sep': depthwise.mult_adds + pointwise.mult_adds,
  }


def format_design_notes_example(example: dict[str, int]) -> str:
  """The example as a short text."""
  return (f"standard 3x3 conv: N_std = {example['N_std']} weights, "
          f"{example['mult_adds_std']:,} mult-adds\n"
          f"depthwise 3x3:     N_dw  = {example['N_dw']}\n"
          f"pointwise 1x1:     N_pw  = {example['N_pw']}\n"
          f"separable:         N_sep = {example['N_sep']} weights, "
          f"{example['mult_adds_sep']:,} mult-adds "
          f"({example['N_sep'] / example['N_std']:.2f} of the standard layer)")


def initialized_counts(model: Any, input_shape: tuple[int, ...]) -> dict[str, dict[str, int]]:
  """Per-module parameter counts of a Flax model, from shapes only (no FLOPs spent).

  Returns {'params': {module path: count}, 'batch_stats': {...}} for cross-checks.
  """
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32)))
  counts = {}
  for collection, tree in variables.items():
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      module = '/'.join(str(getattr(key, 'key', key)) for key in path[:-1])
      flat[module] = flat.get(module, 0) + math.prod(leaf.shape)
    counts[collection] = flat
  return counts
