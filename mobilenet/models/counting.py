"""Exact parameter and mult-add counts for every layer of every variant.

The analytic counts come from the layer table (architecture.py): D_K*D_K*M*N
weights and D_K*D_K*M*N*D_F^2 mult-adds for a standard convolution,
D_K*D_K*M + M*N weights and (D_K*D_K*M + M*N)*D_F^2 mult-adds for a
depthwise-separable one. Tests check them against the parameters Flax
initializes and against XLA's cost analysis of the compiled forward pass.
"""
import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from mobilenet.models import architectures as architecture
from mobilenet.models.architectures import LayerSpec


@dataclasses.dataclass(frozen=True)
class Totals:
  """Whole-network counts."""
  params: int  # Trainable: weights, biases, BatchNorm scale and offset.
  batch_stats: int  # BatchNorm running mean and variance (not trained).
  weights: int  # Convolution and classifier kernels only: the paper's "parameters".
  mult_adds: int  # Per example, forward pass.

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def model_layer_specs(config: ml_collections.ConfigDict) -> list[LayerSpec]:
  """The layer table of the model a full experiment config describes."""
  model = config.model
  return architecture.layer_specs(
      width_multiplier=model.width_multiplier, resolution=model.resolution, form=model.form,
      conv_type=model.conv_type, num_classes=model.num_classes, min_channels=model.min_channels,
      input_channels=config.input.channels)


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
