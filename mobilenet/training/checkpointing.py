"""Orbax checkpoints under <workdir>/checkpoints: save, keep K, resume, fall back.

Orbax writes each checkpoint to a temporary folder and renames it when it is
complete, so `kill -9` at any moment leaves at worst an unfinished temporary
folder, which is ignored. A checkpoint that exists but cannot be read (a
damaged disk, a truncated copy) is skipped with a warning in favour of the
one before it; nothing is deleted.
"""
import pathlib

import jax
import orbax.checkpoint as ocp
from absl import logging

from mobilenet.errors import UserError


class _DropOrbaxInfo(logging.logging.Filter):
  """Orbax logs a dozen INFO lines per save, and warns that a read-only manager is read-only."""

  def filter(self, record) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if 'read only' in record.getMessage().replace('_', ' '):
      return False
    return record.levelno >= logging.logging.WARNING


def _quiet_orbax() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
    handler.addFilter(_DropOrbaxInfo())


class Checkpoints:
  """Asynchronous saving and fault-tolerant restoring of a pytree state."""

  def __init__(self, directory: str | pathlib.Path, keep: int = 1, read_only: bool = False):
    """`read_only` (for evaluation) never creates, cleans or deletes: a run that is
    still training keeps the temporary folder of the checkpoint it is writing."""
    _quiet_orbax()
    self._manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=True, cleanup_tmp_directories=not read_only))

  def save(self, step: int, state) -> None:
    """Starts writing `state` as checkpoint `step`; returns before the write is done."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_latest(self, abstract_state):
    """The newest readable checkpoint (shapes, dtypes, shardings from `abstract_state`), or None."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    for position, step in enumerate(steps):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as error:  # Orbax raises many types for unreadable files.
        older = steps[position + 1] if position + 1 < len(steps) else None
        logging.warning('checkpoint %d in %s cannot be read (%s: %s); %s', step,
                        self._manager.directory, type(error).__name__, str(error)[:200],
                        f'falling back to checkpoint {older}' if older is not None else
                        'no older checkpoint is left')
        continue
      logging.info('restored checkpoint %d from %s', step, self._manager.directory)
      return state
    if steps:
      raise UserError(
          f'none of the checkpoints {steps} in {self._manager.directory} can be read; move that '
          'folder away to start afresh, or pass a new --workdir')
    return None

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state, sharding):
  """Shape/dtype/sharding stand-ins for every leaf of `state`, for restoring."""
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      state)
