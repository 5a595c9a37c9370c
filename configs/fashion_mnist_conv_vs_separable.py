"""Ablation: depthwise-separable vs standard convolutions (the paper's Table 4) on Fashion-MNIST.

  python3 scripts/sweep.py --config configs/fashion_mnist_conv_vs_separable.py \
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
from mobilenet.training.config_base import sibling_config

default = sibling_config(__file__, 'default')


def get_config():
  """The default recipe (configs/default.py, alpha 0.25) for 2 epochs, the conv-type grid in `sweep`."""
  config = default.get_config()
  config.num_epochs = 2.0
  # Read by scripts/sweep.py when no --sweep flag is given; the trainer ignores it.
  config.sweep = 'model.conv_type=separable,standard'
  return config
