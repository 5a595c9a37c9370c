"""Ablation: depthwise-separable vs standard convolutions (the paper's Table 4) on Fashion-MNIST.

  python scripts/sweep.py --config configs/fashion_mnist_conv_vs_separable.py \
      --workdir runs/conv_vs_separable

trains the same network (alpha 0.25, 28x28, same data and schedule) once with
depthwise-separable and once with standard 3x3 convolutions, each for 2
epochs, then writes the comparison to runs/conv_vs_separable. Compare the
wider network as well with --config.model.width_multiplier=0.5 (and a new
--workdir).

Expected: standard convolutions cost about 8x the parameters and mult-adds for
a small gain in accuracy (the paper: 1% on ImageNet); numbers and cost not yet
measured (a few minutes for the separable variant on 2 CPU cores, several
times that for the standard one).
"""
from mobilenet.config_base import base_config


def get_config():
  """The default Fashion-MNIST recipe at alpha 0.25, 2 epochs, the conv-type grid in `sweep`."""
  config = base_config()
  config.dataset = 'fashion_mnist'
  config.model.width_multiplier = 0.25
  config.model.resolution = 28
  config.model.num_classes = 10
  config.input.channels = 1
  config.input.random_crop_padding = 2
  config.input.random_flip = True
  config.batch_size = 128
  config.num_epochs = 2.0
  config.optimizer.learning_rate = 0.1
  config.schedule.warmup_epochs = 0.2
  config.checkpoint_every_steps = 500
  # Read by scripts/sweep.py when no --sweep flag is given; the trainer ignores it.
  config.sweep = 'model.conv_type=separable,standard'
  return config
