"""Starting a run from another run's weights (config.init_from): fine-tuning.

    python3 scripts/train.py --config configs/finetune_fashion_mnist.py --workdir runs/ft \
        --config.init_from=runs/keras_mobilenet_v1_0.25_128

The source is any run folder (scripts/train.py's or scripts/import_weights.py's):
its newest intact checkpoint gives the weights and BatchNorm statistics (its
EMA ones when it kept an average, as its eval used them). What changes:

- the classifier ('head') is kept when the class count is the same and keeps
  this run's fresh initialization when it is not;
- the stem's kernel follows this run's input channels: summed over RGB for
  grayscale input (a gray image g then gives what (g, g, g) gave the source),
  spread evenly over RGB for a grayscale source;
- the step, the optimizer state (and EMA, which restarts from the loaded
  weights) and the data position start fresh: this is step 0 of a new run.

The architecture must be the same (name, width multiplier, conv type, min
channels, V1's activation, BatchNorm epsilon), else one line names the field
that differs. Resolution, form and normalization may differ (logged).
train.py calls `initialize` only when the workdir holds no checkpoint: a
resumed run continues its own state and ignores init_from.
"""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from mobilenet.errors import UserError
from mobilenet.models.mobilenet import create_model, model_plan
from mobilenet.training import checkpointing, config_base, optim, run_folder, storage
from mobilenet.training.train_step import TrainState, create_train_state

# The fields that decide the parameter tree or the function its weights compute.
ARCHITECTURE_FIELDS = ('model.name', 'model.width_multiplier', 'model.conv_type',
                       'model.min_channels', 'model.activation', 'model.batch_norm_epsilon')
# Fields that may differ and are worth a log line: the weights were trained for theirs.
_NOTED_FIELDS = ('model.resolution', 'model.form', 'input.normalization', 'dataset')


def _get(config, field: str):
  for part in field.split('.'):
    config = config[part]
  return config


def load_source_config(source: epath.Path) -> ml_collections.ConfigDict:
  """The source run's config.json (fields added since at their defaults)."""
  config_file = source / run_folder.CONFIG_FILE
  if not source.is_dir():
    raise UserError(f'config.init_from={str(source)!r} is not a folder; pass a run folder that '
                    'scripts/train.py or scripts/import_weights.py wrote, or \'\' to start afresh')
  if not config_file.is_file() or not run_folder.has_checkpoint(source):
    raise UserError(f'config.init_from={str(source)!r} holds no {run_folder.CONFIG_FILE} and '
                    'checkpoint; pass a run folder that scripts/train.py or '
                    "scripts/import_weights.py wrote, or '' to start afresh")
  try:
    recorded = json.loads(config_file.read_text(encoding='utf-8'))
  except (OSError, ValueError) as error:
    raise UserError(f'{config_file} cannot be read ({type(error).__name__}: {error}); restore '
                    'it or pass another --config.init_from') from None
  return ml_collections.ConfigDict(config_base.with_defaults(recorded))


def check_architecture(source_config: ml_collections.ConfigDict,
                       config: ml_collections.ConfigDict, source: epath.Path,
                       log: bool = True) -> None:
  """One line naming the first architecture field that differs; logs the other differences."""
  for field in ARCHITECTURE_FIELDS:
    if field == 'model.activation' and config.model.name != 'mobilenet_v1':
      continue  # Only V1 reads it; V2 and V3 have their activations in their tables.
    there, here = _get(source_config, field), _get(config, field)
    if there != here:
      raise UserError(f'config.init_from={str(source)!r} is a run with config.{field}={there!r}, '
                      f'this config has {here!r}; pass --config.{field}={there!r} (the weights '
                      'fit only the same architecture) or another --config.init_from')
  for field in _NOTED_FIELDS:
    there, here = _get(source_config, field), _get(config, field)
    if there != here and log:
      logging.info('init_from: config.%s is %s here, %s in %s', field, here, there, source)


def restore_source(source: epath.Path, source_config: ml_collections.ConfigDict,
                   sharding) -> tuple[dict, dict, int, bool]:
  """(params, batch_stats, step, whether they are the EMA) of the source's newest checkpoint."""
  model = create_model(source_config.model)
  tx = optim.create_optimizer(  # The schedule's length shapes no state.
      source_config, optim.learning_rate_schedule(source_config, 1, 1))
  side = source_config.model.resolution
  image_shape = (side, side, source_config.input.channels)
  abstract = checkpointing.abstract_like(
      jax.eval_shape(functools.partial(create_train_state, model, tx, source_config, image_shape)),
      sharding)
  state = checkpointing.Checkpoints(source / 'checkpoints', read_only=True).restore_latest(abstract)
  if state is None:
    raise UserError(f'config.init_from={str(source)!r} has no intact checkpoint; pass another '
                    'run folder')
  if state.ema_params is not None:
    return state.ema_params['params'], state.ema_params['batch_stats'], int(state.step), True
  return state.params, state.batch_stats, int(state.step), False


def _stem_kernel_path(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return (model_plan(config.model).stages[0].name, 'conv', 'kernel')


def adapt_params(source_params: dict, target_params: dict, stem_kernel: tuple[str, ...],
                 source: epath.Path) -> tuple[dict, list[str]]:
  """The source's params in the target's shapes; (params, what was adapted, for the log)."""
  theirs = traverse_util.flatten_dict(source_params)
  ours = traverse_util.flatten_dict(target_params)
  extra = sorted(set(theirs) - set(ours))
  if extra or set(ours) - set(theirs):
    name = '/'.join((extra or sorted(set(ours) - set(theirs)))[0])
    raise UserError(f'config.init_from={str(source)!r}: {name} is in one model and not the other '
                    '(not the same architecture); pass a run of this architecture')
  adapted, notes = {}, []
  head_fresh = ours[('head', 'kernel')].shape != theirs[('head', 'kernel')].shape
  if head_fresh:
    notes.append(f"the classifier is initialized afresh ({theirs[('head', 'kernel')].shape[-1]} "
                 f"classes there, {ours[('head', 'kernel')].shape[-1]} here)")
  for path, fresh in ours.items():
    loaded = theirs[path]
    if path[0] == 'head' and head_fresh:
      adapted[path] = fresh
    elif loaded.shape == fresh.shape:
      adapted[path] = loaded
    elif path == stem_kernel and loaded.shape[2] == 3 and fresh.shape[2] == 1:
      # Grayscale input: one channel carries what three equal ones did.
      adapted[path] = jnp.sum(loaded, axis=2, keepdims=True)
      notes.append('the stem kernel is summed over its RGB input channels (grayscale input)')
    elif path == stem_kernel and loaded.shape[2] == 1 and fresh.shape[2] == 3:
      adapted[path] = jnp.repeat(loaded, 3, axis=2) / 3  # (g, g, g) gives what g gave.
      notes.append('the stem kernel is spread over RGB (the source had grayscale input)')
    else:
      raise UserError(f"config.init_from={str(source)!r}: {'/'.join(path)} has shape "
                      f'{tuple(loaded.shape)} there and {tuple(fresh.shape)} here (not the same '
                      'architecture); pass a run of this architecture')
  return traverse_util.unflatten_dict(adapted), notes


def check_before_start(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a bad config.init_from before the workdir is touched (a resume does not read it)."""
  if config.init_from and not run_folder.has_checkpoint(storage.path(workdir)):
    source = storage.path(epath.Path(config.init_from).expanduser())
    check_architecture(load_source_config(source), config, source, log=False)


def initialize(state: TrainState, config: ml_collections.ConfigDict, tx, sharding) -> TrainState:
  """A fresh run's `state` with the weights of the run config.init_from names (see the docstring)."""
  source = storage.path(epath.Path(config.init_from).expanduser())
  source_config = load_source_config(source)
  check_architecture(source_config, config, source)
  params, batch_stats, step, ema = restore_source(source, source_config, sharding)
  params, notes = adapt_params(params, state.params, _stem_kernel_path(config), source)
  params = jax.device_put(params, sharding)
  batch_stats = jax.device_put(batch_stats, sharding)
  jax.tree.map(lambda a, b: _same_shape(a, b, source), batch_stats, state.batch_stats)
  logging.info('init_from: the %sweights and BatchNorm statistics of step %d of %s%s; step, '
               'optimizer state and data position start fresh', 'EMA ' if ema else '', step,
               source, ''.join(f'; {note}' for note in notes))
  return state.replace(
      step=jnp.zeros_like(state.step), params=params, batch_stats=batch_stats,
      opt_state=jax.jit(tx.init, out_shardings=sharding)(params),
      ema_params=({'params': params, 'batch_stats': batch_stats}
                  if state.ema_params is not None else None))


def _same_shape(loaded, fresh, source: epath.Path) -> None:
  if np.shape(loaded) != np.shape(fresh):
    raise UserError(f'config.init_from={str(source)!r}: its BatchNorm statistics have shape '
                    f'{np.shape(loaded)} where this model has {np.shape(fresh)}; pass a run of '
                    'this architecture')
