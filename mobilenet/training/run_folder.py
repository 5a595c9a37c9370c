"""What keeps one run folder consistent: one trainer at a time, one config, each metric once.

- `acquire_lock`: a second trainer on the same workdir is refused at once,
  naming the one that holds it. On a local (or NFS) folder the lock is an
  `fcntl.flock` on <workdir>/train.lock, which the kernel releases when its
  process dies, so the lock of a killed run never blocks the next. An object
  store (gs://) has no locks: there train.lock is an object created only if
  absent (a generation precondition, so two hosts starting at once cannot
  both get it) and deleted when the run ends. Nothing releases it when the
  trainer is killed (kill -9, a lost VM): the next trainer is refused, naming
  the holder and the command that removes the lock; removing it is the
  user's call, since a trainer still running elsewhere cannot be seen from here.
- `check_resume`: a workdir that holds a checkpoint may only be resumed by a
  config that builds the same state from the same data order (dataset, seed,
  batch size, input, model architecture, optimizer and EMA); a change in how
  the same function is computed, logged, kept or how long it runs is
  accepted and logged. A workdir without a checkpoint holds no state: any
  config may start there (a crashed start must not block the fixed command).
- `record_config`: config.json holds the config of the latest accepted
  command; the one it replaces is appended to config_history.jsonl first.
- `rewrite_metrics`: metrics.jsonl is cut back to the restored step (each
  (split, step) once), atomically; rows taken out go to metrics_dropped.jsonl.
"""
import fcntl
import json
import os
import socket
import time

import ml_collections
from absl import logging
from etils import epath

from mobilenet.errors import UserError
from mobilenet.training import config_base, storage

CONFIG_FILE = 'config.json'
CONFIG_HISTORY_FILE = 'config_history.jsonl'
LOCK_FILE = 'train.lock'
METRICS_FILE = 'metrics.jsonl'
DROPPED_METRICS_FILE = 'metrics_dropped.jsonl'

# Sections whose every field shapes the state or the data a step sees ...
_STATE_AND_DATA_SECTIONS = ('model.', 'input.')
_STATE_AND_DATA_FIELDS = ('dataset', 'seed', 'batch_size', 'optimizer.name', 'ema_decay')
# ... except these, which change how the same function is computed or fed; runs recorded
# before a field existed compare as if they had its default.
_IMPLEMENTATION_FIELDS = ('model.depthwise_implementation', 'model.fused_inference',
                          'model.fused_training', 'model.ops',
                          'input.cache', 'input.prefetch_batches')

# Held locks of this process, by workdir: prepare_workdir may be called again for it. A local
# lock is its open file descriptor; a remote one, (the lock's key-value store, its generation).
_held_locks: dict[str, object] = {}


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _as_dict(config: ml_collections.ConfigDict | dict) -> dict:
  """The config as plain JSON values (what config.json holds)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort(sort_keys=True))
  return config


def decides_state_or_data(field: str) -> bool:
  """Whether a resumed run that changed `field` would silently become another run."""
  if field in _IMPLEMENTATION_FIELDS:
    return False
  return field in _STATE_AND_DATA_FIELDS or field.startswith(_STATE_AND_DATA_SECTIONS)


def has_checkpoint(path: epath.Path) -> bool:
  """Whether the workdir holds a committed checkpoint (a state a resume would continue)."""
  folder = path / 'checkpoints'
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir() if p.is_dir())


def config_changes(saved: dict, config: ml_collections.ConfigDict | dict) -> list:
  """[(field, value there, value now)] for every field that differs, defaults filling gaps."""
  defaults = _flatten(_as_dict(config_base.base_config()))
  old, new = _flatten(saved), _flatten(_as_dict(config))
  changes = []
  for field in sorted(set(old) | set(new)):
    before, after = old.get(field, defaults.get(field)), new.get(field, defaults.get(field))
    if before != after:
      changes.append((field, before, after))
  return changes


def check_resume(path: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses, with one line naming the field, a config that would not continue the saved run."""
  saved_file = path / CONFIG_FILE
  if not saved_file.is_file() or not has_checkpoint(path):
    return
  try:
    saved = json.loads(saved_file.read_text(encoding='utf-8'))
  except (OSError, ValueError) as error:
    raise UserError(f'{saved_file} cannot be read ({type(error).__name__}: {error}); restore it '
                    'from config_history.jsonl or pass a new --workdir') from None
  changes = config_changes(saved, config)
  for field, before, after in changes:
    if decides_state_or_data(field):
      raise UserError(f'--workdir {path} holds a run with a different config.{field} ({before} '
                      f'there, {after} now); pass --config.{field}={before} to resume it, or a '
                      'new --workdir to start another run')
  for field, before, after in changes:
    logging.info('resuming with config.%s=%s (was %s)', field, after, before)


def record_config(path: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Writes config.json; a different one it replaces goes to config_history.jsonl first."""
  saved_file = path / CONFIG_FILE
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if saved_file.is_file():
    previous = saved_file.read_text(encoding='utf-8')
    try:
      unchanged = json.loads(previous) == json.loads(text)
    except ValueError:
      unchanged = False
    if unchanged:
      return
    storage.append_text(path / CONFIG_HISTORY_FILE,
                        json.dumps({'replaced_at': time.time(), 'config_json': previous}) + '\n')
  storage.write_atomically(saved_file, text)


def _holder_line() -> str:
  return (f'pid {os.getpid()} on {socket.gethostname()}, since '
          f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')


def acquire_lock(path: epath.Path) -> None:
  """Holds <workdir>/train.lock for this process, or refuses naming the holder."""
  key = str(path)
  if key in _held_locks:
    return
  if not storage.is_local(path):
    _held_locks[key] = _acquire_object_lock(path)
    return
  descriptor = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    holder = os.read(descriptor, 500).decode('utf-8', 'replace').strip() or 'another process'
    os.close(descriptor)
    raise UserError(f'--workdir {path} is in use by another trainer ({holder}); wait for it to '
                    'finish or stop it, or pass another --workdir') from None
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, _holder_line().encode(), 0)
  _held_locks[key] = descriptor


def _acquire_object_lock(path: epath.Path) -> tuple:
  """train.lock on an object store: written only if absent, through TensorStore (Orbax's
  storage layer, which reaches every store Orbax writes to) since a file API has no
  create-if-absent. Reading first names the holder; the conditional write settles a race.
  """
  import tensorstore  # pylint: disable=import-outside-toplevel
  lock = f'{path}/{LOCK_FILE}'
  try:
    store = tensorstore.KvStore.open(f'{path}/').result()
    current = store.read(LOCK_FILE).result()
    if current.state != 'missing':
      raise _LockHeld(current.value.decode('utf-8', 'replace').strip())
    # Only if still missing (GCS: ifGenerationMatch=0); a failed condition returns no generation.
    written = store.write(LOCK_FILE, _holder_line().encode(), if_equal=current.stamp.generation
                          ).result()
    if not written.generation:
      raise _LockHeld(store.read(LOCK_FILE).result().value.decode('utf-8', 'replace').strip())
  except _LockHeld as held:
    raise UserError(f'--workdir {path} is in use by another trainer ({held.holder or "unknown"}; '
                    f'lock {lock}); wait for it to finish or stop it, or pass another --workdir; '
                    f'if that trainer is gone (killed, VM lost), delete the lock: gcloud storage '
                    f'rm {lock}') from None
  except Exception as error:  # TensorStore reports I/O failures as ValueError, among others.
    raise _not_writable(path, error) from None
  return store, written.generation


def _not_writable(path: epath.Path, error: Exception) -> UserError:
  return UserError(f'--workdir {path} cannot be written ({type(error).__name__}: '
                   f'{" ".join(str(error).split())[:200]}); check the path and that this '
                   'machine may write there (e.g. roles/storage.objectUser on the bucket), or '
                   'pass another --workdir')


def create(path: epath.Path) -> None:
  """Creates the workdir; on an object store, where no local check sees the permissions
  (IAM), a refused write is one line."""
  if storage.is_local(path):
    path.mkdir(parents=True, exist_ok=True)
    return
  try:
    path.mkdir(parents=True, exist_ok=True)
  except Exception as error:  # TensorFlow's errors (PermissionDenied, ...) are not OSErrors.
    raise _not_writable(path, error) from None


class _LockHeld(Exception):

  def __init__(self, holder: str):
    super().__init__(holder)
    self.holder = holder


def release_lock(path: epath.Path) -> None:
  held = _held_locks.pop(str(path), None)
  if held is None:
    return
  if isinstance(held, tuple):  # An object: deleted only while it is still the one we wrote.
    store, generation = held
    try:
      store.write(LOCK_FILE, None, if_equal=generation).result()
    except Exception as error:  # The run's work is saved; a lock left behind is reported.
      logging.warning('could not delete %s/%s (%s); delete it before the next run', path,
                      LOCK_FILE, " ".join(str(error).split())[:200])
    return
  fcntl.flock(held, fcntl.LOCK_UN)
  os.close(held)


def rewrite_metrics(path: epath.Path, restored_step: int) -> dict[tuple[str, int], dict]:
  """Keeps each (split, step) row once, up to the restored step; returns the rows kept.

  Rows after the restored step are recomputed by the resumed run (bitwise the
  same); from step 0 everything is. A line cut short by a kill is not JSON
  and goes too. Nothing is lost: what is taken out is appended to
  metrics_dropped.jsonl before metrics.jsonl is replaced in one rename.
  """
  metrics_file = path / METRICS_FILE
  if not metrics_file.is_file():
    return {}
  kept, lines, dropped = {}, [], []
  for line in metrics_file.read_text(encoding='utf-8').splitlines():
    try:
      record = json.loads(line)
      key = (record['split'], int(record['step']))
    except (ValueError, KeyError, TypeError):
      dropped.append(line)
      continue
    if restored_step == 0 or key[1] > restored_step or key in kept:
      dropped.append(line)
      continue
    kept[key] = record
    lines.append(line)
  if dropped:
    storage.append_text(path / DROPPED_METRICS_FILE, ''.join(line + '\n' for line in dropped))
    storage.write_atomically(metrics_file, ''.join(line + '\n' for line in lines))
    logging.info('metrics.jsonl cut back to step %d (%d rows moved to %s)', restored_step,
                 len(dropped), DROPPED_METRICS_FILE)
  return kept
