"""Run folders on a local disk or an object store: one path type and the few writes that differ.

A workdir, a sweep folder or an eval output may be any path etils.epath opens:
a local folder, or gs://bucket/... (TensorFlow's file system when TensorFlow is
installed, as here; fsspec otherwise). Local paths keep the POSIX guarantees the
run folder relies on (fsync, rename over a file, flock); an object store has
none of those and needs none: an object appears whole when its upload ends or
not at all, so a plain write already replaces atomically, and a "rename" is a
copy and a delete (fine for moving a damaged checkpoint aside, never used for
atomicity there).
"""
import os

from etils import epath


def path(location: str | os.PathLike) -> epath.Path:
  """The epath of `location`; a local one made absolute (as the run folder code always had)."""
  result = epath.Path(location)
  return result.absolute() if is_local(result) else result


def is_local(location: str | os.PathLike) -> bool:
  """Whether `location` is on this machine's file system (no scheme such as gs://)."""
  return '://' not in os.fspath(location)


def write_atomically(file: epath.Path, text: str) -> None:
  """Replaces `file` with `text`: readers see the old or the new content, never a part."""
  if not is_local(file):
    file.write_text(text, encoding='utf-8')  # An object is published whole when its upload ends.
    return
  temporary = file.with_name(file.name + '.tmp')
  with open(temporary, 'w', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, file)


def append_text(file: epath.Path, text: str) -> None:
  """Appends `text` to `file` (created if missing), durably.

  An object store cannot append: the object is read and written again whole
  (these files are small, and written by one process: the lock holder).
  """
  if not is_local(file):
    previous = file.read_text(encoding='utf-8') if file.exists() else ''
    file.write_text(previous + text, encoding='utf-8')
    return
  with open(file, 'a', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
