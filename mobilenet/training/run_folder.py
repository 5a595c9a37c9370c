"""What keeps one run folder consistent: one trainer at a time, one config, each metric once.

- `acquire_lock`: a second trainer on the same workdir is refused at once,
  naming the one that holds it. The lock is an `fcntl.flock` on
  <workdir>/train.lock, which the kernel releases when its process dies, so
  the lock of a killed run never blocks the next.
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
import pathlib
import socket
import time

import ml_collections
from absl import logging

from mobilenet.errors import UserError
from mobilenet.training import config_base

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
_IMPLEMENTATION_FIELDS = ('model.depthwise_implementation', 'model.fused_inference', 'model.ops',
                          'input.cache', 'input.prefetch_batches')

# Held locks of this process, by workdir: prepare_workdir may be called again for it.
_held_locks: dict[str, int] = {}


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


def has_checkpoint(path: pathlib.Path) -> bool:
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


def check_resume(path: pathlib.Path, config: ml_collections.ConfigDict) -> None:
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


def _write_atomically(path: pathlib.Path, text: str) -> None:
  temporary = path.with_name(path.name + '.tmp')
  with open(temporary, 'w', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def record_config(path: pathlib.Path, config: ml_collections.ConfigDict) -> None:
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
    with open(path / CONFIG_HISTORY_FILE, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'replaced_at': time.time(), 'config_json': previous}) + '\n')
      f.flush()
      os.fsync(f.fileno())
  _write_atomically(saved_file, text)


def acquire_lock(path: pathlib.Path) -> None:
  """Holds <workdir>/train.lock for this process, or refuses naming the holder."""
  key = str(path)
  if key in _held_locks:
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
  os.pwrite(descriptor, f'pid {os.getpid()} on {socket.gethostname()}, since '
                        f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode(), 0)
  _held_locks[key] = descriptor


def release_lock(path: pathlib.Path) -> None:
  descriptor = _held_locks.pop(str(path), None)
  if descriptor is not None:
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    os.close(descriptor)


def rewrite_metrics(path: pathlib.Path, restored_step: int) -> dict[tuple[str, int], dict]:
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
    with open(path / DROPPED_METRICS_FILE, 'a', encoding='utf-8') as f:
      f.write(''.join(line + '\n' for line in dropped))
      f.flush()
      os.fsync(f.fileno())
    _write_atomically(metrics_file, ''.join(line + '\n' for line in lines))
    logging.info('metrics.jsonl cut back to step %d (%d rows moved to %s)', restored_step,
                 len(dropped), DROPPED_METRICS_FILE)
  return kept
