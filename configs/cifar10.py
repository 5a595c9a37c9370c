"""CIFAR-10 with the 32x32 'cifar' form of MobileNetV1.

  python3 scripts/train.py --config configs/cifar10.py --workdir runs/cifar10
  python3 scripts/train.py --config configs/cifar10.py:0.5 --workdir runs/cifar10_0.5

The optional argument after ':' is the width multiplier (default 1.0).
Expected: not yet measured. Needs TFDS cifar10 (downloads itself with network;
offline, prepare it elsewhere with `tfds build cifar10` and point
--config.data_dir at it).
"""
from mobilenet.training.config_base import base_config


def get_config(width_multiplier=None):
  """Pad-4 crop + flip, SGD + Nesterov 0.1, cosine over 100 epochs, weight decay 5e-4."""
  config = base_config()
  config.dataset = 'cifar10'
  config.model.width_multiplier = float(width_multiplier or 1.0)
  config.model.resolution = 32
  config.model.num_classes = 10
  config.input.channels = 3
  config.input.random_crop_padding = 4
  config.input.random_flip = True
  config.batch_size = 128
  config.num_epochs = 100.0
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 5e-4
  config.schedule.warmup_epochs = 2.0
  return config
