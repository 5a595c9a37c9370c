"""Fashion-MNIST at full width: the longer schedule for real comparisons.

  python3 scripts/train.py --config configs/fashion_mnist.py --workdir runs/fmnist
  python3 scripts/train.py --config configs/fashion_mnist.py:0.5 --workdir runs/fmnist_0.5

The optional argument after ':' is the width multiplier (default 1.0).
Expected: not yet measured (the Fashion-MNIST benchmark lists a MobileNet at 95.0%).
"""
from mobilenet.training.config_base import base_config


def get_config(width_multiplier=None):
  """Alpha from the argument (1.0 by default), 28x28 grayscale, 30 epochs."""
  config = base_config()
  config.dataset = 'fashion_mnist'
  config.model.width_multiplier = float(width_multiplier or 1.0)
  config.model.resolution = 28
  config.model.num_classes = 10
  config.input.channels = 1
  config.input.random_crop_padding = 2
  config.input.random_flip = True
  config.batch_size = 128
  config.num_epochs = 30.0
  config.optimizer.learning_rate = 0.1
  config.schedule.warmup_epochs = 1.0
  return config
