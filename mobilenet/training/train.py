"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

One command trains on this CPU, one GPU, or a multi-host slice: the state is
replicated and the global batch sharded over a one-axis device mesh
(parallel.py); rerunning the same command resumes from the newest readable
checkpoint, including the data position, since batch k is a pure function of
(config.seed, k) (input_pipeline.py) and so is the dropout key (train_step.py).
"""
import functools
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mobilenet.training import (checkpointing, config_base, init_from, memory, metrics, optim,
                                 parallel, run_folder, storage)
from mobilenet.models import counting
from mobilenet.errors import UserError
from mobilenet.models import fused_inference
from mobilenet.models.mobilenet import create_model
from mobilenet.training.train_step import (DIVERGENCE_REASONS, TrainState, create_train_state,
                                           eval_step, run_once, train_step)

CONFIG_FILE = run_folder.CONFIG_FILE
# Where checkpoints that a diverged run had saved go (kept, never deleted).
DIVERGED_FOLDER = 'diverged'
# What the log promises while a step compiles (measured: 4-5 s for the default
# config on 2 cores).
_COMPILE_TIME = 'once per run; seconds for small models, up to minutes for large ones'


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> epath.Path:
  """Checks, creates and locks the workdir and records the config; refuses a mismatched resume.

  Checks come first, so that bad input leaves an existing workdir untouched;
  the lock (held until `run_folder.release_lock`) keeps a second trainer out.
  The workdir may be local or on an object store (gs://bucket/runs/name).
  """
  path = storage.path(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f'--workdir {path} is a file, not a folder; pass a folder path')
  existing = path
  while storage.is_local(path) and not existing.exists():
    existing = existing.parent
  # A bucket's permissions are IAM roles that no local check sees: there the first writes
  # (run_folder.create, acquire_lock) are the probe, and a refusal is one line.
  if storage.is_local(path) and not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'--workdir {path} is not writable ({existing} denies writing); pass a '
                    'folder you can write to')
  run_folder.check_resume(path, config)
  if jax.process_index() == 0:
    run_folder.create(path)
    run_folder.acquire_lock(path)
    try:
      run_folder.check_resume(path, config)  # Again, under the lock: a run may have just ended.
      run_folder.record_config(path, config)
    except BaseException:
      run_folder.release_lock(path)
      raise
  return path


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.num_train_steps, or num_epochs worth of steps when it is -1."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return max(int(config.num_epochs * steps_per_epoch), 1)


class Preemption:
  """When to save and stop because this job is being preempted, agreed by every host.

  One host: SIGTERM sets a flag that the loop reads after each step. Several
  hosts: each would see its own signal at its own step, and a collective
  checkpoint save needs them all at the same one. There JAX's preemption
  service (started by `jax.distributed.initialize`, which also catches SIGTERM)
  spreads the notice to every host and picks the step all of them reach next;
  `reached(step)` is True on every host at that same step. It must be asked at
  every step, so no Python handler is installed then (it would take SIGTERM
  from the service).
  """

  def __init__(self):
    self._multihost = jax.process_count() > 1
    self._raised = False
    self._previous = None
    if not self._multihost:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._raised = True

  def reached(self, step: int) -> bool:
    if self._multihost:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return multihost_utils.reached_preemption_sync_point(step)
    return self._raised

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate(state: TrainState, eval_fn, config: ml_collections.ConfigDict,
             sharding) -> dict[str, float]:
  """Loss, top-1 and top-5 over the whole test split, each example exactly once."""
  from mobilenet.data import input_pipeline  # TensorFlow is imported with the data, not before.
  totals = None
  for batch in input_pipeline.create_eval_iterator(config):
    sums = eval_fn(state, parallel.global_batch(batch, sharding))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss_sum']) / count, 'top1': float(totals['top1_hits']) / count,
          'top5': float(totals['top5_hits']) / count, 'examples': count}


def _summarize_train(pending: list, step: int, interval_start: float,
                     batch_size: int) -> dict[str, float]:
  """Means of the steps since the last report; stops the run at the first diverged step."""
  fetched = jax.device_get(pending)  # Waits for the asynchronously dispatched steps.
  interval_seconds = time.perf_counter() - interval_start
  for index, m in enumerate(fetched):
    if int(m['nonfinite']):
      raise NonFiniteLoss(step - len(fetched) + 1 + index,
                          f"{DIVERGENCE_REASONS[int(m['nonfinite'])]}; loss {float(m['loss']):.4g}")
  summary = {key: float(np.mean([m[key] for m in fetched])) for key in ('loss', 'accuracy')}
  summary['learning_rate'] = float(fetched[-1]['learning_rate'])
  summary['images_per_second'] = len(fetched) * batch_size / max(interval_seconds, 1e-9)
  return summary


class NonFiniteLoss(Exception):
  """A step diverged (train_step.divergence): `step` is the first, `reason` says how."""

  def __init__(self, step: int, reason: str = ''):
    super().__init__(step, reason)
    self.step = step
    self.reason = reason


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir` to the end; returns the final eval metrics."""
  started = time.perf_counter()
  config_base.validate(config)
  parallel.check_batch_size(config.batch_size, 'batch_size')
  parallel.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  from mobilenet.data import input_pipeline  # TensorFlow is imported with the data, not before.
  input_pipeline.ensure_available(config)
  info = input_pipeline.get_dataset_info(config)
  if info.num_classes != config.model.num_classes:
    raise UserError(f'config.model.num_classes={config.model.num_classes} but {info.name} has '
                    f'{info.num_classes} classes; pass --config.model.num_classes={info.num_classes}')
  steps_per_epoch = input_pipeline.steps_per_epoch(config)  # Refuses a batch over the split.
  memory.check_fits(config, info.image_shape)
  init_from.check_before_start(config, workdir)
  workdir = prepare_workdir(workdir, config)  # Last: everything before it changes no file.

  input_pipeline.decode_in_background(config)  # Overlaps the init and compiles below.
  mesh = parallel.create_mesh()
  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  model = create_model(config.model)
  num_steps = total_train_steps(config, steps_per_epoch)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch, num_steps)
  tx = optim.create_optimizer(config, schedule)

  init = jax.jit(functools.partial(create_train_state, model, tx, config, info.image_shape),
                 out_shardings=replicated)
  checkpoints = checkpointing.Checkpoints(workdir / 'checkpoints', config.keep_checkpoints)
  state = checkpoints.restore_latest(checkpointing.abstract_like(jax.eval_shape(init), replicated))
  if state is None:
    state = metrics.log_first_call(functools.partial(run_once, init),
                                   'the model initialization', 'seconds')()
    if config.init_from:
      state = init_from.initialize(state, config, tx, replicated)
  elif config.init_from:
    logging.info('resuming the run in %s: config.init_from=%s is not read (it only starts a '
                 'new run)', workdir, config.init_from)
  start_step = int(state.step)
  # Each (split, step) once: rows after the restored step are written again below.
  recorded = run_folder.rewrite_metrics(workdir, start_step) if jax.process_index() == 0 else {}

  writer = metrics.MetricWriter(workdir)
  specs = counting.model_layer_specs(config)
  model_counts = counting.totals(specs).as_dict()
  if start_step == 0:
    writer.write(0, 'model', model_counts)
  logging.info('%s: %s; %d steps (%d per epoch), %d devices on %d hosts; %s', info.name,
               f'{config.model.name} alpha {config.model.width_multiplier} at '
               f'{config.model.resolution}',
               num_steps, steps_per_epoch, jax.device_count(), jax.process_count(),
               f'resuming at step {start_step}' if start_step else 'starting')

  batch_spec = {key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                for key, (shape, dtype) in input_pipeline.train_batch_shapes(config).items()}
  train_fn = metrics.compile_ahead(jax.jit(
      parallel.on_mesh(mesh, functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                               config=config)),
      in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
      donate_argnums=0), (state, batch_spec), 'the training step', _COMPILE_TIME)
  apply_fn, eval_path = fused_inference.eval_apply(model, config.model.fused_inference)
  logging.info(eval_path)
  eval_fn = metrics.log_first_call(jax.jit(
      parallel.on_mesh(mesh, functools.partial(eval_step, apply_fn=apply_fn, config=config,
                                               use_ema=config.ema_decay > 0)),
      in_shardings=(replicated, batch_sharding), out_shardings=replicated),
      'the eval step', _COMPILE_TIME)
  eval_every = steps_per_epoch if config.eval_every_steps == -1 else config.eval_every_steps
  log_every = config.log_every_steps if config.log_every_steps > 0 else 100
  checkpoint_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                      else steps_per_epoch)

  preemption = Preemption()
  progress = metrics.Progress(num_steps, start_step, config.batch_size)
  train_batches = input_pipeline.create_train_iterator(config, start_step=start_step)
  pending, interval_start = [], time.perf_counter()
  eval_metrics = {}

  def evaluate_and_record(step: int) -> dict[str, float]:
    scores = evaluate(state, eval_fn, config, batch_sharding)
    if ('eval', step) not in recorded:
      writer.write(step, 'eval', scores)
    logging.info('eval at step %d: top-1 %.4f top-5 %.4f loss %.4f (%d examples)', step,
                 scores['top1'], scores['top5'], scores['loss'], scores['examples'])
    return scores

  try:
    # The eval of the restored step, when a kill came between its checkpoint and its row, and
    # the final accuracy of a finished run, printed again. Decided on process 0 (which holds
    # metrics.jsonl) for every host: evaluating is collective.
    missed = start_step > 0 and (start_step >= num_steps or (
        start_step % eval_every == 0 and ('eval', start_step) not in recorded))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      missed = bool(multihost_utils.broadcast_one_to_all(np.int32(missed)))
    if missed:
      eval_metrics = evaluate_and_record(start_step)
    for step in range(start_step + 1, num_steps + 1):
      state, step_metrics = train_fn(state, parallel.global_batch(next(train_batches),
                                                                  batch_sharding))
      if step == start_step + 1:
        metrics.log_start_up(step_metrics)
      pending.append(step_metrics)
      progress.advance(step)
      last = step == num_steps
      preempted = preemption.reached(step)  # Asked once per step: the signal may arrive meanwhile.
      will_save = last or step % checkpoint_every == 0 or preempted
      if step % log_every == 0 or will_save:
        summary = _summarize_train(pending, step, interval_start, config.batch_size)
        pending, interval_start = [], time.perf_counter()
        writer.write(step, 'train', summary)
        progress.report(step, f"loss {summary['loss']:.4f} acc {summary['accuracy']:.4f} "
                              f"lr {summary['learning_rate']:.4g}")
      if will_save:
        checkpoints.save(step, state)
      if preempted:
        checkpoints.wait()
        logging.warning('SIGTERM (preemption) at step %d%s: checkpoint saved in %s; rerun the '
                        'same command to resume', step,
                        ' on every host' if jax.process_count() > 1 else '', workdir)
        return {}
      if last or step % eval_every == 0:
        with progress.paused(state):
          eval_metrics = evaluate_and_record(step)
        interval_start = time.perf_counter()
  except NonFiniteLoss as error:
    checkpoints.wait()
    # The state saved just before the first bad step is the one that produced it.
    suspect = [s for s in checkpoints.all_steps() if s >= error.step - 1]
    checkpoints.set_aside(suspect, DIVERGED_FOLDER)
    good = checkpoints.latest_step()
    kept = (f'the last good checkpoint (step {good}) is kept in {workdir}' if good is not None
            else f'no checkpoint before it is left in {workdir}, so a rerun starts from step 0')
    moved = (f' (checkpoint {", ".join(map(str, suspect))} moved to '
             f'checkpoints/{DIVERGED_FOLDER}/)' if suspect else '')
    raise UserError(
        f'the training became NaN or infinite or exploded at step {error.step} ({error.reason}); '
        f'{kept}{moved}; lower --config.optimizer.learning_rate or set '
        '--config.optimizer.grad_clip_norm, and rerun') from None
  finally:
    preemption.restore()
    progress.close()
    try:
      checkpoints.close()
    finally:
      writer.close()
      if jax.process_index() == 0:
        run_folder.release_lock(workdir)
  results = {**eval_metrics, **{key: float(value) for key, value in model_counts.items()}}
  if jax.process_index() == 0:
    logging.info('%s', metrics.run_summary(workdir, results, time.perf_counter() - started,
                                           start_step, num_steps))
  return results
