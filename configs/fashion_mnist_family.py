"""Comparing families: MobileNetV1, V2 and V3-Small on Fashion-MNIST with one recipe.

  python3 scripts/sweep.py --config configs/fashion_mnist_family.py --workdir runs/family

trains each architecture of the grid in `config.sweep` (override it with
--sweep model.name=... --sweep model.width_multiplier=...) at alpha 1.0 with the
default recipe (28x28 grayscale, cifar form, SGD + Nesterov 0.1, cosine, weight
decay 1e-4, no augmentation) for 2 epochs, then writes the comparison
(results.csv, accuracy_vs_params.png and accuracy_vs_mult_adds.png with one
series per architecture) to runs/family.

Measured (2-core Intel Xeon VM, 2026-11-30): top-1 89.79 / 90.54 / 89.97% for V1 / V2 /
V3-Small (3.22M / 2.24M / 1.53M parameters); 10 min 20 s / 12 min 39 s / 4 min 46 s per
run with a test suite sharing the cores; README "Results: the MobileNet family" has the
table and plots.
"""
from mobilenet.training.config_base import sibling_config

default = sibling_config(__file__, 'default')


def get_config():
  """The default recipe for 2 epochs at alpha 1.0, the architectures in `sweep`."""
  config = default.get_config()
  config.model.width_multiplier = 1.0
  config.num_epochs = 2.0
  # Read by scripts/sweep.py when no --sweep flag is given; the trainer ignores it.
  config.sweep = 'model.name=mobilenet_v1,mobilenet_v2,mobilenet_v3_small'
  return config
