"""Prepares TFDS's `fashion_mnist` offline, from the Debian package's files.

TFDS normally downloads Fashion-MNIST from the dataset's web site. Offline, the
Debian package `dataset-fashion-mnist` has the same four IDX files under
`/usr/share/datasets/fashion-mnist/`. Their gzip headers differ from the files
TFDS registered checksums for, but the decompressed bytes are identical, so we
run TFDS's own `fashion_mnist` builder (same features, splits, version and file
names) and only swap its download step for decompressing the local files. The
result is an ordinary TFDS dataset: `tfds.builder('fashion_mnist',
data_dir=...)` loads it like one built with `tfds build fashion_mnist`.
"""
import contextlib
import io
import os
import sys
import tempfile
import time

from absl import logging
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist

from mobilenet.data import preparation_lock
from mobilenet.errors import UserError

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FILENAMES = (
    'train-images-idx3-ubyte.gz',
    'train-labels-idx1-ubyte.gz',
    't10k-images-idx3-ubyte.gz',
    't10k-labels-idx1-ubyte.gz',
)


def debian_files_available(source_dir: str = DEBIAN_DIR) -> bool:
  """Returns whether all four Fashion-MNIST files are in `source_dir`."""
  return all(os.path.isfile(os.path.join(source_dir, f)) for f in FILENAMES)


class _LocalFiles:
  """Stands in for the builder's DownloadManager: URLs map to local .gz files.

  The builder only calls `download_and_extract` with a dict of URLs; we answer
  with the same file names taken from `source_dir`, decompressed by the real
  DownloadManager's `extract` (which verifies no checksum, as none applies).
  """

  def __init__(self, dl_manager, source_dir: str):
    self._dl_manager = dl_manager
    self._source_dir = source_dir

  def download_and_extract(self, urls: dict[str, str]) -> dict[str, str]:
    local = {
        key: os.path.join(self._source_dir, os.path.basename(url))
        for key, url in urls.items()
    }
    for key, path in local.items():
      logging.info('fashion_mnist: using %s for %s', path, urls[key])
    return self._dl_manager.extract(local)


class _LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
  """TFDS's `fashion_mnist` builder reading its source files from a local dir.

  Same `name`, `VERSION` and `_info` as the registered builder, so the prepared
  directory is `<data_dir>/fashion_mnist/<version>/` with the usual files.
  """

  name = 'fashion_mnist'

  def __init__(self, *, source_dir: str, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    return super()._split_generators(_LocalFiles(dl_manager, self._source_dir))


def prepare(data_dir: str | None, source_dir: str = DEBIAN_DIR) -> bool:
  """Writes TFDS's `fashion_mnist` into `data_dir` from the local IDX files.

  Idempotent: returns False without work when the dataset is already prepared
  in `data_dir`, True after preparing it (about 30 s on 2 CPU cores, logging
  progress). The decompressed files live in a temporary directory that is
  removed afterwards. Raises UserError if a source file is missing.

  Args:
    data_dir: TFDS data dir (local or gs://); None for TFDS's default.
    source_dir: directory with the four `*-ubyte.gz` files.
  """
  registered = tfds.builder('fashion_mnist', data_dir=data_dir)
  if registered.is_prepared():
    logging.info('fashion_mnist is already prepared in %s', registered.data_dir)
    return False
  # Concurrent preparations into one dir collide on TFDS's final rename.
  with preparation_lock.exclusive(registered.data_dir_root, 'fashion_mnist'):
    if tfds.builder('fashion_mnist', data_dir=data_dir).is_prepared():
      logging.info('fashion_mnist was prepared in %s by another process', registered.data_dir)
      return False
    _prepare_locked(data_dir, source_dir)
  return True


def _prepare_locked(data_dir: str | None, source_dir: str) -> None:
  """Builds the dataset; the caller holds the preparation lock."""
  if not debian_files_available(source_dir):
    raise UserError(
        f'Fashion-MNIST files {", ".join(FILENAMES)} are not all in '
        f'{source_dir}: install the Debian package dataset-fashion-mnist '
        '(or pass their directory as source_dir).')
  builder = _LocalFashionMNIST(source_dir=source_dir, data_dir=data_dir)
  logging.info(
      'Preparing fashion_mnist in %s from %s (offline, once per data dir; about 15-30 s)...',
      builder.data_dir, source_dir)
  start = time.perf_counter()
  # TFDS prints "Downloading and preparing dataset Unknown size ..." (there is
  # no download here) and "... downloaded and prepared" to stdout: these log
  # lines say it instead. Its progress bars only help on a terminal.
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory(prefix='fashion_mnist_') as download_dir, \
       contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(
        download_dir=download_dir,
        # No GCS mirror lookup: it needs the network, which we avoid here.
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  logging.info('Prepared fashion_mnist in %s in %.0f s', builder.data_dir,
               time.perf_counter() - start)
