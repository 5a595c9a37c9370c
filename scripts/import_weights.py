r"""Turns keras.applications MobileNet weights into a run folder that eval.py and train.py accept.

  python3 scripts/import_weights.py --config configs/imagenet.py \
      --keras_weights imagenet --workdir runs/keras_mobilenet_v1
  python3 scripts/import_weights.py --config configs/imagenet.py:0.25,128 \
      --keras_weights ~/Downloads/mobilenet_2_5_128_tf.h5 --workdir runs/keras_mobilenet_v1_0.25_128
  python3 scripts/import_weights.py --config configs/imagenet.py \
      --config.model.name=mobilenet_v3_small --keras_weights imagenet --workdir runs/keras_v3_small

--keras_weights: a file Keras saved (.h5 or .weights.h5) for the configured
architecture, width and class count, or 'imagenet' (the official file: from
Keras' cache, downloaded when the network allows, else one line saying which
file to fetch and where to put it). The run folder holds config.json and
checkpoint 0; mobilenet/training/import_weights.py says which config fields
Keras fixes (and sets them).
"""

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags
from ml_collections import config_flags

from mobilenet import compilation_cache, errors
from mobilenet.training import import_weights

_CONFIG = config_flags.DEFINE_config_file('config', None, errors.CONFIG_HELP,
                                          lock_config=True)
_KERAS_WEIGHTS = flags.DEFINE_string(
    'keras_weights', None, "A Keras weights file (.h5 or .weights.h5) or 'imagenet'.")
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run folder to create.')
errors.mark_required(['config', 'keras_weights', 'workdir'])


def main(argv):
  compilation_cache.enable()  # Before anything compiles.
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; pass settings as --config.x=y')
  import_weights.import_keras_weights(_CONFIG.value, _KERAS_WEIGHTS.value, _WORKDIR.value)


if __name__ == '__main__':
  errors.run(main)
