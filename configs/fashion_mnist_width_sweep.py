"""Ablation: the width multiplier alpha (the paper's Table 6 and Figures 4-5) on Fashion-MNIST.

  python3 scripts/sweep.py --config configs/fashion_mnist_width_sweep.py --workdir runs/width_sweep

trains alpha 1.0, 0.75, 0.5, 0.25 with the default recipe (the grid in `config.sweep`; override it with
--sweep model.width_multiplier=...), each for 1 epoch at 28x28, then writes
the comparison (results.csv, accuracy_vs_params.png, ...) to runs/width_sweep.
Print the per-variant commands for a scheduler with --dry_run.

Measured (2-core CPU, 2026-11-28): top-1 84.71 / 87.17 / 87.72 / 88.02% for alpha
0.25 / 0.5 / 0.75 / 1.0 (215k / 823k / 1.82M / 3.22M parameters); 1,946 s for the
whole sweep with evaluation (202 / 334 / 603 / 549 s per variant, with a test suite
sharing the cores).
"""
from mobilenet.training.config_base import sibling_config

default = sibling_config(__file__, 'default')


def get_config():
  """The default recipe (configs/default.py) for 1 epoch, with the width grid in `sweep`."""
  config = default.get_config()
  config.num_epochs = 1.0
  # Read by scripts/sweep.py when no --sweep flag is given; the trainer ignores it.
  config.sweep = 'model.width_multiplier=1.0,0.75,0.5,0.25'
  return config
