"""Where the real training or eval step spends its time, by kind of layer, from a profile of the compiled step.

benchmark.py times whole steps and layer_timing.py times layers one by one;
this profiles the project's own jitted training step (the same one
benchmark.py times) with `jax.profiler`, and gives each executed operation to
the kind of layer whose Flax module emitted it, read from the compiled HLO's
`op_name` metadata (e.g. `.../block_03/depthwise/...` or, in the backward
pass, `transpose(jvp(MobileNet))/block_03/depthwise/...`):

- 'depthwise', 'pointwise', 'standard' (the stem and other dense k x k
  convolutions), 'dense' (classifier, pre-logits): the layers of
  counting.layer_specs, forward and backward;
- 'depthwise_pointwise' (eval only): a depthwise layer and the 1x1 layers
  around it computed by one kernel (ops/separable.py: the product after it, an
  inverted residual block's expansion before it, or both), with their arithmetic;
- 'batch_norm_activation': every BatchNorm with its activation, except a
  V2/V3 expansion's when it is fused into the depthwise layer
  (ops/norm_depthwise.py): that one runs inside the depthwise layer's call
  and counts as 'depthwise';
- 'squeeze_excite': V3's pooling, two dense layers and the rescale;
- 'residual_and_glue': what a block does outside its layers (residual adds);
- 'loss_optimizer_other': the loss, the optimizer update and the rest.

The eval step (`step='eval'`) is the trainer's: with config.model.fused_inference
the fused transformation (models/fused_inference.py), which names its
operations after the same layers; there a BatchNorm computed inside a depthwise
or pointwise kernel counts as that layer, and only the folding of its
statistics into a scale and bias as 'batch_norm_activation'.

Operations run on up to as many threads as there are cores, so the summed
operation time can exceed the wall time; shares are of the summed time. The
step's operation count and the time in which none of them ran (`idle_ms`: the
runtime dispatching the next one, Python calling the next step) say how much a
step of many small operations loses between them. Each kind's arithmetic
(counting.py's mult-adds, times 3 for forward + both backward products) over
its time gives its GFLOP/s (forward only, times 1, for the eval step), to compare with what a large matrix product
reaches on the same machine (`matmul_ceiling`).
"""
import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mobilenet.bench import benchmark
from mobilenet.models import counting

KINDS = ('depthwise', 'pointwise', 'depthwise_pointwise', 'standard', 'dense',
         'batch_norm_activation', 'squeeze_excite', 'residual_and_glue', 'loss_optimizer_other')
# Fused inference's one kernel for a depthwise layer and the layers around it (ops/separable.py),
# e.g. 'block_03/expand_depthwise_project': group 1 is the block, group 2 the layers it
# computes, joined by '_' ('stem': the network's stem, computed inside the first block's kernel).
_SEPARABLE = re.compile(r'/(\w+)/((?:expand|stem)_depthwise(?:_(?:pointwise|project))?'
                        r'|depthwise_(?:pointwise|project))/')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"',
                          re.MULTILINE)


def _separable_layers(hlo_text: str) -> Dict[str, set]:
  """Block -> the layers of it that one separable kernel computes ('stem' -> {'conv'} when the
  first block's kernel computes the stem)."""
  fused = collections.defaultdict(set)
  for block, layers in _SEPARABLE.findall(hlo_text):
    layers = set(layers.split('_'))
    if 'stem' in layers:
      fused['stem'].add('conv')
    fused[block] |= layers - {'stem'}
  return dict(fused)


def _layer_kind(spec: counting.LayerSpec) -> str:
  """The profile's kind of a counted layer: its own kind, except SE's dense layers."""
  return 'squeeze_excite' if '/se/' in f'/{spec.name}/' else spec.kind


def _kind_of(op_name: str, layers: Dict[str, str], blocks: List[str]) -> str:
  """The kind of layer an HLO operation belongs to, from its Flax module path."""
  path = '/' + op_name + '/'
  if _SEPARABLE.search(path):
    return 'depthwise_pointwise'
  for name, kind in layers.items():  # Longest names first: 'block_03/se/squeeze' before 'block_03/se'.
    if f'/{name}/' in path:
      return kind
  if re.search(r'/\w*bn/', path):
    return 'batch_norm_activation'
  if '/se/' in path:
    return 'squeeze_excite'
  if any(f'/{block}/' in path for block in blocks):
    return 'residual_and_glue'
  return 'loss_optimizer_other'


def _operation_kinds(hlo_text: str, config: ml_collections.ConfigDict) -> Dict[str, str]:
  """HLO instruction name -> kind of layer, for every instruction with an op_name."""
  specs = counting.model_layer_specs(config)
  layers = {spec.name: _layer_kind(spec) for spec in sorted(specs, key=lambda s: -len(s.name))}
  blocks = sorted({spec.name.split('/')[0] for spec in specs})
  return {name: _kind_of(op_name, layers, blocks)
          for name, op_name in _INSTRUCTION.findall(hlo_text)}


def _traced_events(run, steps: int) -> List[Dict[str, Any]]:
  """The complete ('X') events of a profiler trace of `steps` calls of `run`."""
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    try:
      for _ in range(steps):
        run()
    finally:
      jax.profiler.stop_trace()
    trace_file, = glob.glob(os.path.join(folder, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(trace_file) as stream:
      events = json.load(stream)['traceEvents']
  return [event for event in events if event.get('ph') == 'X']


def _operation_times(events: List[Dict[str, Any]]) -> Dict[str, float]:
  """Summed microseconds per event name."""
  totals = collections.Counter()
  for event in events:
    totals[event['name']] += float(event.get('dur', 0.0))
  return totals


def _idle_microseconds(events: List[Dict[str, Any]], operations) -> float:
  """Time between the first and last of the `operations` during which none of them ran.

  The operations parallelize inside themselves (XLA's fusions and the C++
  kernels split their loops over the cores), so one runs at a time; between
  them the runtime dispatches the next (a few microseconds each) and, between
  steps, Python calls the step again. That time shows up in no operation.
  """
  spans = sorted((float(event['ts']), float(event['ts']) + float(event.get('dur', 0.0)))
                 for event in events if event['name'] in operations)
  if not spans:
    return 0.0
  covered, end = 0.0, spans[0][0]
  for start, stop in spans:
    if stop > end:
      covered += stop - max(start, end)
      end = stop
  return end - spans[0][0] - covered


def _flops_per_image(config: ml_collections.ConfigDict, products: int = 3,
                     separable_layers: Optional[Dict[str, set]] = None) -> Dict[str, float]:
  """FLOPs per image by kind of layer: 2 per mult-add, times `products` (training: forward and
  two backward products; eval: 1). The layers of `separable_layers` (block -> {'expand',
  'depthwise', 'project'}, say) count as 'depthwise_pointwise', the one kernel that computes
  them."""
  flops = collections.Counter()
  for spec in counting.model_layer_specs(config):
    block, _, layer = spec.name.partition('/')
    fused = layer in (separable_layers or {}).get(block, ())
    flops['depthwise_pointwise' if fused else _layer_kind(spec)] += products * 2 * spec.mult_adds
  return flops


def matmul_ceiling(size: int = 2048, steps: int = 5) -> float:
  """GFLOP/s of a large float32 matrix product under XLA: what this machine's cores reach."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
  product = jax.jit(lambda x: x @ x)
  seconds = benchmark.median_seconds(lambda: jax.block_until_ready(product(a)), 2, steps)
  return 2 * size ** 3 / seconds / 1e9


def profile_train_step(config: ml_collections.ConfigDict, *, warmup: int = 2, steps: int = 5,
                       step: str = 'train') -> Dict[str, Any]:
  """Profiles `steps` training (or, with step='eval', eval) steps of `config`'s model on synthetic batches.

  Returns the step's wall time, and per kind of layer: its milliseconds per
  step, share of the summed operation time, and GFLOP/s where it does arithmetic.
  """
  if step not in ('train', 'eval'):
    raise ValueError(f"step must be 'train' or 'eval', not {step!r}")
  state, train_step, eval_step = benchmark._steps(config)  # pylint: disable=protected-access
  batch = benchmark.synthetic_batch(config)
  if step == 'train':
    compiled = jax.jit(train_step, donate_argnums=(0,)).lower(state, batch).compile()
  else:
    compiled = jax.jit(eval_step).lower(state, batch).compile()
  hlo_text = compiled.as_text()
  kinds = _operation_kinds(hlo_text, config)

  def run():
    nonlocal state
    if step == 'train':
      state, metrics = compiled(state, batch)
    else:
      metrics = compiled(state, batch)
    jax.block_until_ready(metrics)

  wall_s = benchmark.median_seconds(run, warmup, steps)
  events = _traced_events(run, steps)
  per_kind = collections.Counter()
  for name, micros in _operation_times(events).items():
    if name in kinds:
      per_kind[kinds[name]] += micros / steps / 1e3
  operations = sum(1 for event in events if event['name'] in kinds) / steps
  total_ms = sum(per_kind.values())
  flops = _flops_per_image(config, products=3 if step == 'train' else 1,
                           separable_layers=_separable_layers(hlo_text))
  rows = []
  for kind in KINDS:
    ms = per_kind.get(kind, 0.0)
    gflops = flops.get(kind, 0) * config.batch_size / (ms / 1e3) / 1e9 if ms and flops.get(kind) else None
    rows.append({'kind': kind, 'ms_per_step': round(ms, 2),
                 'share': round(ms / total_ms, 3) if total_ms else None,
                 'gflop_s': None if gflops is None else round(gflops, 1)})
  images_s = config.batch_size / wall_s
  return {'step': step, 'architecture': config.model.name,
          'width_multiplier': config.model.width_multiplier,
          'resolution': config.model.resolution, 'batch_size': config.batch_size,
          'step_ms': round(1e3 * wall_s, 2), f'{step}_img_s': round(images_s, 1),
          'operations_ms': round(total_ms, 2), 'operations_per_step': round(operations),
          'idle_ms': round(_idle_microseconds(events, kinds) / steps / 1e3, 2),
          'model_gflop_s': round(sum(flops.values()) * images_s / 1e9, 1), 'kinds': rows}


def format_profile(profile: Dict[str, Any], ceiling_gflop_s: float = None) -> str:
  """The profile as a text table, with the whole step's fraction of the ceiling when given."""
  step = profile.get('step', 'train')
  head = (f"{profile['architecture']} alpha {profile['width_multiplier']} at "
          f"{profile['resolution']}, batch {profile['batch_size']}: {step} step "
          f"{profile['step_ms']} ms ({profile[f'{step}_img_s']} img/s), "
          f"{profile['operations_per_step']} operations "
          f"{profile['operations_ms']} ms, none running {profile['idle_ms']} ms, "
          f"model arithmetic {profile['model_gflop_s']} GFLOP/s")
  if ceiling_gflop_s:
    head += (f' = {profile["model_gflop_s"] / ceiling_gflop_s:.0%} of the {ceiling_gflop_s:.0f} '
             'GFLOP/s matrix-product ceiling')
  lines = [head, f"{'kind':<24}{'ms/step':>10}{'share':>8}{'GFLOP/s':>10}"]
  for row in profile['kinds']:
    share = '' if row['share'] is None else f"{row['share']:.1%}"
    gflops = '' if row['gflop_s'] is None else f"{row['gflop_s']:.1f}"
    lines.append(f"{row['kind']:<24}{row['ms_per_step']:>10.2f}{share:>8}{gflops:>10}")
  return '\n'.join(lines)
