"""Where a training step spends its time, by kind of layer.

Each weight-holding layer of the configured variant (counting.layer_specs)
is compiled on its own at the shape it sees inside the network, as forward +
backward (gradients with respect to its input and its parameters, the work it
does in a training step), and timed on random inputs: the convolutions with
the configured op set's modules (ops/op_sets.py, and the configured depthwise
implementation), the BatchNorm + activation after each of them in training
mode (timed with MobileNetV1's configured activation for every layer), the
stem, and the dense layers (classifier, pre-logits, squeeze-and-excitation). Summing per kind gives each kind's
share of the layers' time, beside the measured time of the whole training step
(benchmark.py), which also holds the loss, the optimizer update and whatever
XLA fuses across layers. Works on any backend; no dataset needed.
"""
import collections
from typing import Any, Callable, Dict, Iterator, List

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mobilenet.bench import benchmark
from mobilenet.models import blocks, counting
from mobilenet.models import mobilenet as model_lib
from mobilenet.ops import depthwise, op_sets

KINDS = ('depthwise', 'pointwise', 'batch_norm_activation', 'stem', 'dense')


def _ops(config: ml_collections.ConfigDict) -> op_sets.OpSet:
  """The configured op set in training mode."""
  model = config.model
  return op_sets.op_set(model.ops, train=True, dtype=model_lib.DTYPES[model.dtype],
                        batch_norm_momentum=model.batch_norm_momentum,
                        batch_norm_epsilon=model.batch_norm_epsilon,
                        depthwise_implementation=model.depthwise_implementation)


def _module_for(spec: counting.LayerSpec, config: ml_collections.ConfigDict) -> nn.Module:
  """The Flax module that computes `spec`'s layer, without its BatchNorm."""
  if spec.kind == 'dense':
    return nn.Dense(spec.out_channels, dtype=model_lib.DTYPES[config.model.dtype])
  groups = spec.in_channels if spec.kind == 'depthwise' else 1
  return _ops(config).conv(spec.out_channels, (spec.kernel_size,) * 2, spec.stride,
                           feature_group_count=groups)


def _norm_activation(config: ml_collections.ConfigDict) -> nn.Module:
  """BatchNorm + activation in training mode (batch statistics)."""
  return _ops(config).norm(activation=blocks.ACTIVATIONS[config.model.activation])


def _forward_backward(module: nn.Module, input_shape, dtype, seed: int) -> Callable[[], Any]:
  """A zero-argument callable that runs the compiled forward + backward of `module` once."""
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(rng.standard_normal(input_shape, np.float32)).astype(dtype)
  variables = module.init(jax.random.key(seed), inputs)
  params = variables.pop('params')
  mutable = list(variables) or False  # BatchNorm updates its statistics in training mode.

  def forward(p, x):
    out = module.apply({'params': p, **variables}, x, mutable=mutable)
    return out[0] if mutable else out

  output = jax.eval_shape(forward, params, inputs)
  cotangent = jnp.asarray(rng.standard_normal(output.shape, np.float32)).astype(output.dtype)

  def loss(p, x):
    return jnp.sum(forward(p, x).astype(jnp.float32) * cotangent.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return lambda: jax.block_until_ready(grad(params, inputs))


def time_layers(config: ml_collections.ConfigDict, *, warmup: int = 2,
                steps: int = 10) -> Iterator[Dict[str, Any]]:
  """Yields one row per layer, as each is timed: name, kind, input shape, forward + backward ms.

  Layers of the same kind and input shape (blocks 7-11, and every BatchNorm
  of one shape) are compiled and timed once; compiling dominates on a GPU.
  """
  model = config.model
  specs = counting.model_layer_specs(config)
  dtype = model_lib.DTYPES[model.dtype]
  batch = config.batch_size
  measured = {}
  for index, spec in enumerate(specs):
    if spec.kind == 'dense':
      jobs = [('dense', spec.name, _module_for(spec, config), (batch, spec.in_channels))]
    else:
      in_shape = (batch, spec.in_size, spec.in_size, spec.in_channels)
      out_shape = (batch, spec.out_size, spec.out_size, spec.out_channels)
      kind = 'stem' if spec.kind == 'standard' else spec.kind
      jobs = [(kind, spec.name, _module_for(spec, config), in_shape),
              ('batch_norm_activation', f'{spec.name}_bn', _norm_activation(config), out_shape)]
    for kind, name, module, shape in jobs:
      key = (kind, repr(module), shape)
      if key not in measured:
        run = _forward_backward(module, shape, dtype, seed=config.seed + index)
        measured[key] = benchmark.median_seconds(run, warmup, steps)
      yield {'layer': name, 'kind': kind, 'input_shape': list(shape),
             'ms': round(1e3 * measured[key], 3)}


def summarize(rows: List[Dict[str, Any]], config: ml_collections.ConfigDict,
              train_step_ms: float) -> Dict[str, Any]:
  """Per-kind totals and shares of the layers' summed time, beside the whole step's time."""
  totals = collections.Counter()
  for row in rows:
    totals[row['kind']] += row['ms']
  layers_ms = sum(totals.values())
  return {
      'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind,
      'architecture': config.model.name,
      'width_multiplier': config.model.width_multiplier,
      'resolution': config.model.resolution,
      'batch_size': config.batch_size,
      'dtype': config.model.dtype,
      'depthwise_implementation': depthwise.resolve_implementation(
          config.model.depthwise_implementation),
      'train_step_ms': train_step_ms,
      'layers_sum_ms': round(layers_ms, 2),
      **{f'{kind}_ms': round(totals[kind], 2) for kind in KINDS},
      **{f'{kind}_share': round(totals[kind] / layers_ms, 3) for kind in KINDS},
  }


def format_summary(summary: Dict[str, Any]) -> str:
  """A Markdown table: one row per kind of layer, with ms and share of the layers' time."""
  lines = [f"{summary['device']} ({summary['backend']}), {summary['architecture']} alpha {summary['width_multiplier']}, "
           f"{summary['resolution']}x{summary['resolution']}, batch {summary['batch_size']}, "
           f"{summary['dtype']}, depthwise {summary['depthwise_implementation']}: whole training "
           f"step {summary['train_step_ms']} ms, layers alone (forward + backward) "
           f"{summary['layers_sum_ms']} ms",
           '', '| layers | ms | share |', '|---|---|---|']
  lines += [f"| {kind} | {summary[f'{kind}_ms']} | {100 * summary[f'{kind}_share']:.1f}% |"
            for kind in KINDS]
  return '\n'.join(lines)

