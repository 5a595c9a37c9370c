"""CIFAR-100 with the 32x32 'cifar' form of MobileNetV1.

  python3 scripts/train.py --config configs/cifar100.py --workdir runs/cifar100
  python3 scripts/train.py --config configs/cifar100.py:0.5 --workdir runs/cifar100_0.5

The optional argument after ':' is the width multiplier (default 1.0).
Expected: not yet measured. Needs TFDS cifar100 (downloads itself with network;
offline, prepare it elsewhere with `tfds build cifar100` and point
--config.data_dir at it).
"""
from mobilenet.training.config_base import sibling_config

cifar10 = sibling_config(__file__, 'cifar10')


def get_config(width_multiplier=None):
  """CIFAR-10's recipe (configs/cifar10.py) on the 100 classes of CIFAR-100."""
  config = cifar10.get_config(width_multiplier)
  config.dataset = 'cifar100'
  config.model.num_classes = 100
  return config
