"""A run folder's model and inference variables, restored as scripts/eval.py restores them.

`restore(workdir)` reads the run's config.json and newest intact checkpoint
(experiments/evaluate.py's `load_run_config` and `abstract_train_state`, the
trainer's Orbax layout) and returns the model with the variables evaluation
uses: the EMA parameters and statistics when the run kept them
(config.ema_decay > 0), else the trained ones.
"""
import dataclasses
import pathlib
from typing import Any

import jax
import ml_collections

from mobilenet.errors import UserError
from mobilenet.experiments import evaluate
from mobilenet.models.mobilenet import MobileNet
from mobilenet.training import checkpointing, parallel, train


@dataclasses.dataclass
class RestoredRun:
  """What an export needs from a run."""
  workdir: str
  config: ml_collections.ConfigDict
  model: MobileNet
  variables: dict[str, Any]  # {'params', 'batch_stats'}, host numpy arrays.
  image_shape: tuple[int, int, int]  # (H, W, C) of one input image.
  step: int
  ema: bool


def restore(workdir: str, data_dir: str | None = None) -> RestoredRun:
  """The run's model and the variables its evaluation uses; UserError when there are none."""
  config = evaluate.load_run_config(workdir)
  if config is None:
    raise UserError(f'--workdir {workdir}: no {train.CONFIG_FILE} there; pass the folder a '
                    'training run wrote (scripts/train.py --workdir)')
  if data_dir:
    config.data_dir = data_dir
  if evaluate.latest_checkpoint_step(workdir) is None:
    raise UserError(f'--workdir {workdir}: the run has no checkpoint yet; train it first '
                    f'(scripts/train.py --workdir {workdir})')
  from mobilenet.data import input_pipeline  # TensorFlow is imported with the data, not before.
  input_pipeline.ensure_available(config)
  info = input_pipeline.get_dataset_info(config)
  replicated = parallel.replicated(parallel.create_mesh())
  model, abstract = evaluate.abstract_train_state(
      config, info.image_shape, input_pipeline.steps_per_epoch(config), replicated)
  state = checkpointing.Checkpoints(pathlib.Path(workdir) / 'checkpoints',
                                    read_only=True).restore_latest(abstract)
  if state is None:
    raise UserError(f'--workdir {workdir}: no readable checkpoint; check '
                    f'{workdir}/checkpoints (damaged ones are listed in the training log)')
  ema = config.ema_decay > 0 and state.ema_params is not None
  variables = (state.ema_params if ema
               else {'params': state.params, 'batch_stats': state.batch_stats})
  return RestoredRun(workdir=str(workdir), config=config, model=model,
                     variables=jax.device_get(variables), image_shape=tuple(info.image_shape),
                     step=int(state.step), ema=ema)
