"""Prepares TFDS's fashion_mnist offline from the Debian package's files.

  python3 scripts/prepare_fashion_mnist.py --data_dir ~/tensorflow_datasets

Training does this by itself when fashion_mnist is missing; this script does
it ahead of time. A second run is a no-op. See mobilenet/data/fashion_mnist_offline.py.
"""

from absl import flags, logging

from mobilenet import errors
from mobilenet.data import fashion_mnist_offline

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir; default: TFDS_DATA_DIR, else ~/tensorflow_datasets.')
_SOURCE_DIR = flags.DEFINE_string('source_dir', fashion_mnist_offline.DEBIAN_DIR,
                                  'Directory with the four *-ubyte.gz files.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; use --data_dir and --source_dir')
  logging.set_verbosity(logging.INFO)
  fashion_mnist_offline.prepare(_DATA_DIR.value, _SOURCE_DIR.value)


if __name__ == '__main__':
  errors.run(main)
