"""The inference graph that exports: every BatchNorm folded into the convolution before it.

In inference mode BatchNorm is a per-channel affine map x * a + b
(ops/batch_norm.py's `inference_affine`). After a convolution without bias it
folds into that convolution: kernel * a (a scales each output channel, the
kernel's last axis, for dense and depthwise kernels alike) and bias b. What
remains of each `norm` is its activation.

`fold(model, variables)` returns the same network built with the 'folded' op
set (ops/op_sets.py: `nn.Conv` with a bias, `norm` = the activation alone) and
its parameters, so `folded_model.apply({'params': folded_params}, images)`
equals `model.apply(variables, images, train=False)` up to float32 rounding.
Nothing but standard convolutions, dense layers and element-wise ops stays in
the graph: no C++ kernels (`jax.ffi` calls do not export), no BatchNorm
statistics. The training model and its parameter tree are untouched.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mobilenet.models.mobilenet import MobileNet
from mobilenet.ops import op_sets

Variables = dict[str, Any]


def norm_of(conv_name: str) -> str:
  """The BatchNorm that follows a convolution, by the blocks' naming (models/blocks.py)."""
  return 'bn' if conv_name == 'conv' else f'{conv_name}_bn'


def _is_norm(name: str) -> bool:
  return name == 'bn' or name.endswith('_bn')


def _fold_module(params: dict, stats: dict, epsilon: float) -> dict:
  """One module's parameters with each BatchNorm child folded into the convolution it follows."""
  folded = {}
  for name, child in params.items():
    if _is_norm(name):
      continue  # Folded with its convolution below.
    norm = norm_of(name)
    if 'kernel' in child and norm in params:
      folded[name] = _fold_conv(child['kernel'], params[norm], stats[norm], epsilon)
    elif 'kernel' in child:  # A dense layer (SE, pre-logits, head) keeps its own bias.
      folded[name] = {key: np.asarray(value) for key, value in child.items()}
    else:
      folded[name] = _fold_module(child, stats.get(name, {}), epsilon)
  return folded


def _fold_conv(kernel, norm_params: dict, norm_stats: dict, epsilon: float) -> dict:
  """{'kernel', 'bias'} of conv -> BatchNorm, computed in float64 and stored as float32."""
  variance = np.asarray(norm_stats['var'], np.float64)
  scale = np.asarray(norm_params['scale'], np.float64) / np.sqrt(variance + epsilon)
  bias = (np.asarray(norm_params['bias'], np.float64)
          - np.asarray(norm_stats['mean'], np.float64) * scale)
  return {'kernel': (np.asarray(kernel, np.float64) * scale).astype(np.float32),
          'bias': bias.astype(np.float32)}


def fold(model: MobileNet, variables: Variables) -> tuple[MobileNet, dict]:
  """(the folded float32 model, its params) computing `model`'s inference function."""
  folded_params = _fold_module(jax.device_get(variables['params']),
                               jax.device_get(variables.get('batch_stats', {})),
                               model.batch_norm_epsilon)
  folded_model = model.clone(ops=op_sets.FOLDED, dtype=jnp.float32, dropout_rate=0.0)
  channels = model.plan.stages[0].in_channels
  expected = jax.eval_shape(folded_model.init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, channels)))['params']
  if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(folded_params):
    raise ValueError(f'folding {model.plan.architecture}: the folded parameters do not match the '
                     'folded model (a BatchNorm that does not follow a convolution?)')
  return folded_model, folded_params
