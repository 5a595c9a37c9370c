"""Ablation: the width multiplier alpha (the paper's Table 6 and Figures 4-5) on Fashion-MNIST.

  python scripts/sweep.py --config configs/fashion_mnist_width_sweep.py --workdir runs/width_sweep

trains alpha 1.0, 0.75, 0.5, 0.25 with the default recipe (the grid in `config.sweep`; override it with
--sweep model.width_multiplier=...), each for 1 epoch at 28x28, then writes
the comparison (results.csv, accuracy_vs_params.png, ...) to runs/width_sweep.
Print the per-variant commands for a scheduler with --dry_run.

Expected: accuracy falls smoothly as alpha shrinks while parameters fall about
as alpha^2 (the paper's trend); numbers and cost not yet measured (alpha 0.25
trains at roughly 300-800 img/s on 2 free CPU cores, a few minutes for 2
epochs; alpha 1.0 is several times slower).
"""
from configs import default


def get_config():
  """The default recipe (configs/default.py) for 1 epoch, with the width grid in `sweep`."""
  config = default.get_config()
  config.num_epochs = 1.0
  # Read by scripts/sweep.py when no --sweep flag is given; the trainer ignores it.
  config.sweep = 'model.width_multiplier=1.0,0.75,0.5,0.25'
  return config
