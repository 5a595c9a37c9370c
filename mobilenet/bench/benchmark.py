"""Training- and eval-step throughput of the MobileNet family on synthetic batches.

For each setting (architecture, width multiplier, batch, resolution, dtype, depthwise
implementation) this builds the configured model, compiles the training step
and the eval step, runs a few warm-up steps, and reports the median
images/second over the timed steps, the compile times and the memory XLA
plans for the step. No dataset is read: inputs are random images of the
configured shape, so the numbers measure the model and step alone.

Start-up is part of the row: the seconds to initialize the model and optimizer,
to trace and lower the train step, to compile it, and its first call; and in the
first row, the seconds from the command's start (the process's creation, so the
interpreter, imports and the C++ kernels' build or load count) to the end of the
first training step.
"""
import dataclasses
import functools
import itertools
import resource
import statistics
import time
from typing import Any, Dict, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mobilenet import malloc_tuning
from mobilenet.ops import depthwise
from mobilenet.training import metrics
from mobilenet.models import fused_inference
from mobilenet.models import mobilenet as model_lib


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the benchmark table."""
  architecture: str
  width_multiplier: float
  batch_size: int
  resolution: int
  dtype: str
  implementation: str

  def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with this setting's fields."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.name = self.architecture
    config.model.width_multiplier = self.width_multiplier
    config.batch_size = self.batch_size
    config.model.resolution = self.resolution
    config.model.dtype = self.dtype
    config.model.depthwise_implementation = self.implementation
    return config


def settings_grid(config: ml_collections.ConfigDict, *, architectures=(), width_multipliers=(),
                  batch_sizes=(), resolutions=(), dtypes=(),
                  implementations=()) -> Iterator[Setting]:
  """The cross product of the given values; an empty list means the config's value."""
  model = config.model
  yield from itertools.starmap(Setting, itertools.product(
      architectures or [model.name], width_multipliers or [model.width_multiplier], batch_sizes or [config.batch_size],
      resolutions or [model.resolution], dtypes or [model.dtype],
      implementations or [model.depthwise_implementation]))


def synthetic_batch(config: ml_collections.ConfigDict) -> Dict[str, jnp.ndarray]:
  """Random images and labels of the configured shapes."""
  rng = np.random.default_rng(config.seed)
  shape = (config.batch_size, config.model.resolution, config.model.resolution,
           config.input.channels)
  return {'image': jnp.asarray(rng.standard_normal(shape, np.float32)),
          'label': jnp.asarray(rng.integers(0, config.model.num_classes, config.batch_size)),
          'mask': jnp.ones((config.batch_size,), jnp.bool_)}


def _steps(config: ml_collections.ConfigDict):
  """(state, train_step(state, batch) -> (state, metrics), eval_step(state, batch) -> metrics).

  The project's own TrainState, optimizer and steps (train_step.py, optim.py),
  so the benchmark times the real training step.
  """
  from mobilenet.training import optim  # pylint: disable=g-import-not-at-top
  from mobilenet.training import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  model = model_lib.create_model(config.model)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=100, total_steps=10_000)
  tx = optim.create_optimizer(config, schedule)
  image_shape = (config.model.resolution, config.model.resolution, config.input.channels)
  # Jitted, as train.py does: run eagerly, init dispatches (and compiles) op by op, 10x slower.
  state = train_step_lib.run_once(jax.jit(functools.partial(
      train_step_lib.create_train_state, model, tx, config, image_shape)))
  train_step = functools.partial(train_step_lib.train_step, model=model, tx=tx,
                                 schedule=schedule, config=config)
  apply_fn, _ = fused_inference.eval_apply(model, config.model.fused_inference)
  eval_step = functools.partial(train_step_lib.eval_step, apply_fn=apply_fn, config=config,
                                use_ema=False)
  return state, train_step, eval_step


def _compile(fn, *args, donate_argnums=()):
  """AOT-compiles `fn`; returns (compiled, lower seconds, compile seconds, XLA's planned bytes or None).

  Lowering traces the Python (Flax modules, custom VJPs) into StableHLO;
  compiling is XLA's part.
  """
  start = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - lowered_at
  try:
    analysis = compiled.memory_analysis()
    planned = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
               + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  except (AttributeError, NotImplementedError, TypeError):
    planned = None
  return compiled, lowered_at - start, compile_s, planned


def median_seconds(run, warmup: int, steps: int) -> float:
  """Median wall time of `run()` (which must block until done) after `warmup` calls."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _faults_and_system_seconds() -> tuple[int, float]:
  """This process's minor page faults and system CPU seconds so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_minflt, usage.ru_stime


def _device_peak_bytes() -> Optional[int]:
  """Peak bytes the allocator reports (GPU/TPU); None where it keeps no statistics (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def benchmark_setting(config: ml_collections.ConfigDict, setting: Setting, *, warmup: int = 2,
                      steps: int = 10, first: bool = False) -> Dict[str, Any]:
  """Compiles and times the training and eval steps for one setting; returns one row.

  `first`: this is the command's first setting, so the row also gets
  'command_to_first_step_s' (see the module docstring).
  """
  config = setting.apply(config)
  start = time.perf_counter()
  state, train_step, eval_step = _steps(config)
  batch = synthetic_batch(config)
  jax.block_until_ready((state, batch))
  init_s = time.perf_counter() - start
  train, train_lower_s, train_xla_s, train_bytes = _compile(train_step, state, batch,
                                                            donate_argnums=(0,))

  def run_train():
    nonlocal state
    state, step_metrics = train(state, batch)
    jax.block_until_ready(step_metrics)

  start = time.perf_counter()
  run_train()
  first_train_step_s = time.perf_counter() - start
  command_to_first_step_s = metrics.seconds_since_process_start() if first else None
  evaluate, eval_lower_s, eval_xla_s, eval_bytes = _compile(eval_step, state, batch)
  for _ in range(max(warmup - 1, 0)):  # The first call warmed up too.
    run_train()
  # Page faults in the timed steps: buffers the allocator hands back to the kernel, and gets
  # again zeroed, every step (mobilenet/malloc_tuning.py); none once the allocator keeps them.
  faults_before, system_before = _faults_and_system_seconds()
  train_s = median_seconds(run_train, 0, steps)
  faults_after, system_after = _faults_and_system_seconds()
  eval_s = median_seconds(lambda: jax.block_until_ready(evaluate(state, batch)), warmup, steps)
  return {
      'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind,
      'architecture': setting.architecture,
      'width_multiplier': setting.width_multiplier,
      'batch_size': setting.batch_size,
      'resolution': setting.resolution,
      'form': config.model.form,
      'dtype': setting.dtype,
      'implementation': setting.implementation,
      'resolved_implementation': depthwise.resolve_implementation(setting.implementation),
      'train_img_s': round(setting.batch_size / train_s, 1),
      'eval_img_s': round(setting.batch_size / eval_s, 1),
      'train_step_ms': round(1e3 * train_s, 2),
      'train_faults_per_step': round((faults_after - faults_before) / steps),
      'train_system_ms_per_step': round(1e3 * (system_after - system_before) / steps, 1),
      'allocator': malloc_tuning.active_allocator(),
      'eval_step_ms': round(1e3 * eval_s, 2),
      'params': sum(leaf.size for leaf in jax.tree.leaves(state.params)),
      'batch_stats': sum(leaf.size for leaf in jax.tree.leaves(state.batch_stats)),
      'init_s': round(init_s, 2),
      # Lowering + XLA's compile, and the lowering's share of it.
      'train_compile_s': round(train_lower_s + train_xla_s, 2),
      'train_lower_s': round(train_lower_s, 2),
      'eval_compile_s': round(eval_lower_s + eval_xla_s, 2),
      'first_train_step_s': round(first_train_step_s, 2),
      'command_to_first_step_s': (round(command_to_first_step_s, 2)
                                  if command_to_first_step_s is not None else None),
      'train_planned_mb': train_bytes and round(train_bytes / 2**20, 1),
      'eval_planned_mb': eval_bytes and round(eval_bytes / 2**20, 1),
      'device_peak_mb': _device_peak_bytes() and round(_device_peak_bytes() / 2**20, 1),
      'host_max_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }


COLUMNS = ('architecture', 'width_multiplier', 'batch_size', 'resolution', 'dtype', 'resolved_implementation',
           'train_img_s', 'eval_img_s', 'train_faults_per_step', 'train_compile_s', 'train_lower_s', 'eval_compile_s',
           'first_train_step_s', 'train_planned_mb', 'device_peak_mb')


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
  """A Markdown table of the main columns, then the command's start-up."""
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(str(row[c]) for c in COLUMNS) + ' |' for row in rows]
  if rows and rows[0].get('command_to_first_step_s') is not None:
    lines.append('\n' + format_startup(rows[0]))
  return '\n'.join(lines)


def format_startup(row: Dict[str, Any]) -> str:
  """One line: from the command to the first training step, and where that time went."""
  total = row['command_to_first_step_s']
  before = total - row['init_s'] - row['train_compile_s'] - row['first_train_step_s']
  return (f'start-up: {total:.1f} s from the command to the end of the first training step '
          f'({before:.1f} s interpreter, imports and flags; {row["init_s"]:.1f} s model and '
          f'optimizer init; {row["train_lower_s"]:.1f} s tracing and lowering; '
          f'{row["train_compile_s"] - row["train_lower_s"]:.1f} s XLA compile; '
          f'{row["first_train_step_s"]:.1f} s first step)')
