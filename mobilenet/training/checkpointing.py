"""Orbax checkpoints under <workdir>/checkpoints: save, keep K, resume, fall back.

Orbax writes each checkpoint to a temporary folder and renames it when it is
complete, so `kill -9` at any moment leaves at worst an unfinished temporary
folder, which is ignored. Orbax stores no checksum of the arrays, and an
altered chunk decodes without error, so before that rename we write
`checksums.sha256` (sha256sum's format) over every file of the state, and
once the save is done (at the next save, wait or close) over Orbax's step
bookkeeping too, which it rewrites as it commits. A checkpoint is restored
only after all of them match. One that does not (a
truncated, altered or missing file, or no manifest beside others that have
one) is moved aside to
`checkpoints/damaged/` with a warning, never deleted, and the one before it
is used; the run can then save that step again. A run folder from before
checksums existed (no checkpoint has a manifest) restores its newest readable
checkpoint unverified, with a warning, and adopts it.

Saving checks first that the folder is still there, writable, and has room
for the state, and turns a failed write into one line: a full disk, a
deleted or read-only folder cost the run no more than the unsaved steps.

The folder may be on an object store (gs://): Orbax writes the arrays there
through TensorStore and marks a finished step with commit_success.txt instead
of a rename; the manifests are objects written whole; moving a damaged
checkpoint aside is a copy and a delete (epath's rename).
"""
import errno
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mobilenet.errors import UserError
from mobilenet.training import storage


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


MANIFEST_FILE = 'checksums.sha256'
# Orbax's own bookkeeping at the top of a step folder, rewritten as it commits (after the
# manifest): not part of the state, so checked for being readable, not against a checksum.
_STEP_BOOKKEEPING = ('_CHECKPOINT_METADATA', 'commit_success.txt')
DAMAGED_FOLDER = 'damaged'  # Under checkpoints/: ignored by Orbax, which only lists step numbers.
_TMP_MARKER = '.orbax-checkpoint-tmp'


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _files(step_folder: epath.Path, bookkeeping: bool = True) -> list[str]:
  """Every file of a step folder but the manifest (and Orbax's bookkeeping, unless asked)."""
  skip = (MANIFEST_FILE,) if bookkeeping else (MANIFEST_FILE, *_STEP_BOOKKEEPING)
  # walk, not rglob: epath refuses `**` on gs:// (one listing per folder is what it costs).
  return sorted(name for folder, _, files in step_folder.walk() for name in
                (str((folder / file).relative_to(step_folder)) for file in files)
                if name not in skip)


def write_manifest(step_folder: str | epath.Path, bookkeeping: bool = True) -> None:
  """Writes checksums.sha256 (`sha256sum -c` reads it) over the folder's files, atomically.

  Without `bookkeeping`, Orbax's step files (not yet final) are left out.
  """
  step_folder = epath.Path(step_folder)
  lines = [f'{_sha256(step_folder / name)}  {name}\n'
           for name in _files(step_folder, bookkeeping)]
  storage.write_atomically(step_folder / MANIFEST_FILE, ''.join(lines))


def verify(step_folder: str | epath.Path) -> str | None:
  """None when every file of the checkpoint matches its manifest, else what is wrong."""
  step_folder = epath.Path(step_folder)
  manifest = step_folder / MANIFEST_FILE
  if not manifest.is_file():
    return f'no {MANIFEST_FILE} (written before checksums existed, or killed as it was committed)'
  try:
    expected = {}
    for line in manifest.read_text(encoding='utf-8').splitlines():
      digest, name = line.split('  ', 1)
      expected[name] = digest
    if not expected:
      return f'{MANIFEST_FILE} lists no files'
    for name, digest in expected.items():
      if not (step_folder / name).is_file():
        return f'{name} is missing'
      if _sha256(step_folder / name) != digest:
        return f'{name} does not match its checksum'
    extra = sorted(set(_files(step_folder)) - set(expected) - set(_STEP_BOOKKEEPING))
    if extra:
      return f'{extra[0]} is not in {MANIFEST_FILE}'
    metadata = step_folder / _STEP_BOOKKEEPING[0]
    if _STEP_BOOKKEEPING[0] not in expected and metadata.exists():  # The newest, not yet sealed.
      json.loads(metadata.read_text(encoding='utf-8'))
  except (OSError, ValueError) as error:  # An unreadable or garbled manifest or metadata file.
    return f'{type(error).__name__}: {" ".join(str(error).split())[:200]}'
  return None


def _first_line(error: BaseException) -> str:
  return ' '.join(str(error).split())[:200]


def _write_problem(error: BaseException) -> tuple[str, str]:
  """(what went wrong, the fix) for an exception raised while writing a checkpoint."""
  chain, seen = [], error
  while seen is not None and len(chain) < 10:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  text = ' '.join(str(e) for e in chain).lower()
  codes = {getattr(e, 'errno', None) for e in chain}
  if errno.ENOSPC in codes or 'no space left' in text or 'resource_exhausted' in text:
    return 'the disk is full', 'free space there'
  if codes & {errno.EROFS, errno.EACCES, errno.EPERM} or 'permission denied' in text or \
      'read-only file system' in text or 'operation not permitted' in text:
    return 'the folder is not writable', 'make it writable'
  if errno.ENOENT in codes or 'no such file' in text or 'not_found' in text:
    return 'the folder was deleted while writing', 'restore the folder'
  return f'{type(error).__name__}: {_first_line(error)}', 'fix the cause'


class Checkpoints:
  """Asynchronous saving and fault-tolerant, verified restoring of a pytree state."""

  def __init__(self, directory: str | epath.Path, keep: int = 1, read_only: bool = False):
    """`read_only` (for evaluation) never creates, cleans, moves or deletes: a run that is
    still training keeps the temporary folder of the checkpoint it is writing."""
    _quiet_orbax()
    self._directory = storage.path(directory)
    self._read_only = read_only
    self._writing = None  # The step being written asynchronously, for its manifest.
    self._sealed = None  # The last step whose manifest covers Orbax's bookkeeping too.
    self._failed = False  # A write failed and was reported: close() must not raise it again.
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=True, cleanup_tmp_directories=not read_only,
            async_options=None if read_only else ocp.AsyncOptions(
                post_finalization_callback=self._write_manifest_of_step_being_written)))

  def _write_manifest_of_step_being_written(self) -> None:
    """Runs on Orbax's background thread once the state's files are complete, before the
    temporary folder is renamed: so a committed checkpoint always carries its manifest."""
    if self._writing is None or jax.process_index() != 0:
      return
    step = self._writing
    candidates = [path for path in self._directory.iterdir()
                  if path.name == str(step) or path.name.startswith(f'{step}{_TMP_MARKER}')]
    for folder in candidates:
      write_manifest(folder, bookkeeping=False)

  def _check_can_write(self, step: int, state) -> None:
    """Fails in milliseconds, naming the problem, where Orbax would print tracebacks or hang.

    With several hosts the verdict is agreed: a host that raised alone would leave the
    others waiting in Orbax's collective save until its barrier timed out.
    """
    problem = self.write_problem(step, state)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      failed = multihost_utils.process_allgather(np.int32(problem is not None))
      if problem is None and failed.any():
        problem = (f'cannot save checkpoint {step} in {self._directory}: host '
                   f'{int(np.flatnonzero(failed)[0])} cannot write there (its log names the '
                   'problem and the fix)')
    if problem is not None:
      raise UserError(problem)

  def write_problem(self, step: int, state) -> str | None:
    """This host's reason why checkpoint `step` cannot be written now, as one line, or None."""
    where = f'cannot save checkpoint {step} in {self._directory}'
    kept = f'the last complete checkpoint ({self.latest_step()}) is kept'
    if not self._directory.is_dir():
      return (f'{where}: the folder was deleted while the run was training; restore it '
              'or rerun the same command to start again')
    # One probe per host and process: hosts sharing the folder (a bucket, NFS) must not delete
    # each other's probe between its write and its removal.
    probe = self._directory / f'.write_probe.{jax.process_index()}.{os.getpid()}'
    try:
      probe.write_bytes(b'0')
      probe.unlink()
    except Exception as error:  # OSError here; TensorFlow's errors on gs://.
      problem, fix = _write_problem(error)
      return (f'{where}: {problem} ({_first_line(error)}); {kept}; {fix} and rerun the '
              'same command to resume')
    if not storage.is_local(self._directory):
      return None  # A bucket has no free space to check.
    needed = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize
                 for leaf in jax.tree.leaves(state)) + (1 << 20)  # Plus Orbax's metadata.
    free = shutil.disk_usage(self._directory).free
    if free < needed:
      return (f'{where}: the disk has {free / 2**20:.1f} MiB free and the checkpoint '
              f'needs about {needed / 2**20:.1f} MiB; {kept}; free space there and rerun '
              'the same command to resume')
    return None

  def _write_failed(self, step: int | None, error: BaseException) -> UserError:
    """Removes the unfinished temporary folder (no data: never committed) and names the problem."""
    self._failed = True
    if jax.process_index() == 0 and step is not None and self._directory.is_dir():
      for path in self._directory.glob(f'{step}{_TMP_MARKER}*'):  # (Local only: no rename on gs://.)
        shutil.rmtree(path, ignore_errors=True)
    problem, fix = _write_problem(error)
    try:
      steps = [int(p.name) for p in self._directory.iterdir() if p.name.isdigit()]
    except Exception:  # pylint: disable=broad-except  # OSError; TensorFlow's errors on gs://.
      steps = []
    return UserError(f'writing checkpoint {step} to {self._directory} failed: {problem}; the last '
                     f'complete checkpoint ({max(steps, default=None)}) is kept; {fix} and rerun '
                     'the same command to resume')

  def save(self, step: int, state) -> None:
    """Starts writing `state` as checkpoint `step`; returns before the write is done."""
    self.wait()  # Orbax waits for the previous save anyway; here its failure names its step.
    self._check_can_write(step, state)
    self._writing = step
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as error:  # Orbax and TensorStore raise many types for I/O errors.
      raise self._write_failed(step, error) from None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state):
    """The newest intact checkpoint (shapes, dtypes, shardings from `abstract_state`), or None.

    Damaged ones newer than it are moved to checkpoints/damaged/ (unless read-only),
    so the run can write those steps again.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if steps and not any((self._directory / str(step) / MANIFEST_FILE).is_file() for step in steps):
      return self._restore_unverified(steps, abstract_state)
    damaged = []
    for position, step in enumerate(steps):
      problem = verify(self._directory / str(step))
      if problem is not None:
        older = steps[position + 1] if position + 1 < len(steps) else None
        logging.warning('checkpoint %d in %s is damaged (%s); %s', step, self._directory, problem,
                        f'falling back to checkpoint {older}' if older is not None else
                        'no older checkpoint is left')
        damaged.append((step, problem))
        continue
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as error:  # Intact files: the state this config builds is another one.
        raise UserError(
            f'checkpoint {step} in {self._directory} is intact but does not fit the training state '
            f'of this config ({type(error).__name__}: {_first_line(error)}); rerun with the config '
            'the run was started with (its config.json) or pass a new --workdir') from None
      if damaged and not self._read_only:
        self.set_aside([s for s, _ in damaged], DAMAGED_FOLDER)
      logging.info('restored checkpoint %d from %s', step, self._directory)
      return state
    if steps:
      problems = '; '.join(f'{step}: {problem}' for step, problem in damaged)
      raise UserError(
          f'none of the checkpoints in {self._directory} is intact ({problems}); move that folder '
          'aside to start afresh, or pass a new --workdir')
    return None

  def _restore_unverified(self, steps: list[int], abstract_state):
    """A run folder from before checksums existed (no step has a manifest): the newest readable one.

    Its files cannot be verified; the checkpoint restored is adopted (given a
    manifest) so that from now on it is.
    """
    for position, step in enumerate(steps):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as error:  # Orbax raises many types for unreadable files.
        older = steps[position + 1] if position + 1 < len(steps) else None
        logging.warning('checkpoint %d in %s cannot be read (%s: %s); %s', step, self._directory,
                        type(error).__name__, _first_line(error),
                        f'falling back to checkpoint {older}' if older is not None else
                        'no older checkpoint is left')
        continue
      logging.warning('checkpoint %d in %s was written before checkpoints carried %s: restored '
                      'without verifying its files', step, self._directory, MANIFEST_FILE)
      if not self._read_only:
        write_manifest(self._directory / str(step))
      return state
    raise UserError(f'none of the checkpoints {steps} in {self._directory} can be read; move that '
                    'folder aside to start afresh, or pass a new --workdir')

  def set_aside(self, steps: list[int], folder: str) -> list[epath.Path]:
    """Moves step folders to checkpoints/<folder>/ (kept, never deleted); Orbax forgets them.

    On gs:// the move copies each object, then deletes it: killed midway, the step is in
    both places, and its original (complete or not) is checked again by the next restore.
    """
    moved = []
    if jax.process_index() == 0:
      for step in steps:
        source = self._directory / str(step)
        if not source.is_dir():
          continue
        target = self._directory / folder / str(step)
        suffix = 1
        while target.exists():
          target = self._directory / folder / f'{step}.{suffix}'
          suffix += 1
        target.parent.mkdir(exist_ok=True)
        source.rename(target)
        moved.append(target)
        logging.warning('moved checkpoint %d to %s (kept for inspection)', step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices('mobilenet_checkpoints_set_aside')
    self._manager.reload()
    return moved

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # The asynchronous write failed: report it once, as one line.
      raise self._write_failed(self._writing, error) from None
    self._seal(self._writing)

  def _seal(self, step: int | None) -> None:
    """Extends a committed checkpoint's manifest to Orbax's (now final) bookkeeping files."""
    if step is None or step == self._sealed or jax.process_index() != 0:
      return
    folder = self._directory / str(step)
    try:
      if folder.is_dir() and verify(folder) is None:  # Damage since the commit is not sealed in.
        write_manifest(folder)
    except Exception as error:  # OSError; TensorFlow's errors on gs://.
      raise self._write_failed(step, error) from None
    self._sealed = step

  def close(self) -> None:
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self._manager.close()
      except Exception as error:  # Already reported above, or nothing left to lose.
        logging.warning('closing the checkpoint manager: %s', _first_line(error))


def abstract_like(state, sharding):
  """Shape/dtype/sharding stand-ins for every leaf of `state`, for restoring."""
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      state)
