"""One process at a time prepares a dataset in a data dir: an inter-process file lock.

Runs started together on a fresh machine (sweep workers, the hosts of a pod
sharing a filesystem) would otherwise all build the same dataset, and TFDS's
final rename of `incomplete.XXXX` to the version directory fails in all but
one (`FileExistsError`). Preparation therefore holds an exclusive
`fcntl.flock` on `<data_dir>/.<dataset>.prepare.lock`; the others wait for it,
saying so in the log, then find the dataset prepared when they re-check.

flock works between processes on one machine and on most shared filesystems
(NFS v4, Lustre, GPFS). Object stores (gs://) have no locks: there, as before,
each process prepares on its own (on a pod, prepare once before launching).
"""
import contextlib
import fcntl
import os
import threading
import time

from absl import logging

# How often a waiting process says it still waits: preparing ImageNet takes hours.
REPORT_EVERY_S = 30.0
_POLL_S = 0.5

# flock conflicts between two open() of one file even in one process, so a
# nested `exclusive` on the same lock (prepare called inside ensure_available)
# would wait for itself: count the holders per path instead.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


def lock_path(data_dir: str, dataset: str) -> str:
  return os.path.join(data_dir, f'.{dataset}.prepare.lock')


def _is_local(path: str) -> bool:
  return '://' not in path


@contextlib.contextmanager
def exclusive(data_dir, dataset: str):
  """Holds the preparation lock of `dataset` in `data_dir` (created if missing) for the block.

  Re-entrant within a process. No-op for paths with a scheme (gs://...).
  """
  data_dir = str(data_dir)  # TFDS hands out its own path objects.
  if not _is_local(data_dir):
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  path = os.path.abspath(lock_path(data_dir, dataset))
  with _held_guard:
    if _held.get(path):
      _held[path] += 1
      reentered = True
    else:
      reentered = False
  if reentered:
    try:
      yield
    finally:
      with _held_guard:
        _held[path] -= 1
    return
  # Opened for append: never truncates a file another process holds, and the
  # lock file stays (removing it would let a third process lock a new inode).
  with open(path, 'a') as handle:
    _acquire(handle, path, dataset)
    with _held_guard:
      _held[path] = 1
    try:
      yield
    finally:
      with _held_guard:
        _held[path] = 0
      fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(handle, path: str, dataset: str) -> None:
  """Takes the lock, logging while another process holds it."""
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return
  except BlockingIOError:
    pass
  start = last_report = time.monotonic()
  logging.info('Another process is preparing %s (lock %s held); waiting for it...', dataset, path)
  while True:
    time.sleep(_POLL_S)
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      break
    except BlockingIOError:
      now = time.monotonic()
      if now - last_report >= REPORT_EVERY_S:
        logging.info('Still waiting for another process to prepare %s (%.0f s so far; lock %s)',
                     dataset, now - start, path)
        last_report = now
  logging.info('Got the %s preparation lock after %.0f s', dataset, time.monotonic() - start)
