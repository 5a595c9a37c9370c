"""Ablation: the resolution multiplier rho (the paper's Table 7 and Figure 4) on Fashion-MNIST.

  python3 scripts/sweep.py --config configs/fashion_mnist_resolution_sweep.py \
      --workdir runs/resolution_sweep

trains alpha 0.25 at 28, 24, 20 and 16 pixels (the images are resized; the
cifar form keeps the stem at stride 1, so 16 pixels still reach a 2x2 final
map), each for 2 epochs, then writes the comparison to runs/resolution_sweep.
Parameters stay the same; mult-adds fall as resolution^2. Change the grid with
--sweep model.resolution=..., add --sweep model.width_multiplier=0.25,0.5 for
the paper's width x resolution product.

Expected: accuracy falls off smoothly with resolution at equal parameters;
numbers and cost not yet measured (a few minutes per variant on 2 CPU cores,
less at lower resolutions).
"""
from mobilenet.training.config_base import sibling_config

default = sibling_config(__file__, 'default')


def get_config():
  """The default recipe (configs/default.py, alpha 0.25) for 2 epochs, the resolution grid in `sweep`."""
  config = default.get_config()
  config.num_epochs = 2.0
  # Read by scripts/sweep.py when no --sweep flag is given; the trainer ignores it.
  config.sweep = 'model.resolution=28,24,20,16'
  return config
