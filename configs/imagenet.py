"""ImageNet (ILSVRC-2012) with the paper's recipe: the published MobileNetV1.

  python3 scripts/train.py --config configs/imagenet.py --workdir runs/imagenet
  python3 scripts/train.py --config configs/imagenet.py:0.5,160 --workdir runs/imagenet_0.5_160

The optional argument after ':' is 'alpha' or 'alpha,resolution' (default 1.0,224).
Recipe: RMSprop (decay 0.9, momentum 0.9, epsilon 1.0), exponential decay x0.94
every 2.5 epochs (TF-slim), little weight decay and none on depthwise filters,
Inception-style crops with a minimum area of 0.25 (the paper limits small crops),
label smoothing 0.1.
Expected: 70.6% top-1 at 1.0/224 per the paper (Table 6); not yet measured here.
Cost: roughly 150 epochs; TFDS imagenet2012 needs the manual download in
<data_dir>/downloads/manual.
"""
from mobilenet.training.config_base import base_config


def get_config(variant=None):
  """The paper's MobileNetV1 at the width and resolution of `variant`."""
  width_multiplier, resolution = 1.0, 224
  if variant:
    parts = str(variant).split(',')
    width_multiplier = float(parts[0])
    resolution = int(parts[1]) if len(parts) > 1 else resolution
  config = base_config()
  config.dataset = 'imagenet2012'
  config.model.form = 'imagenet'
  config.model.width_multiplier = width_multiplier
  config.model.resolution = resolution
  config.model.num_classes = 1000
  config.model.dropout_rate = 1e-3
  config.model.batch_norm_momentum = 0.997
  config.input.channels = 3
  config.input.random_flip = True
  config.input.min_crop_area = 0.25
  config.input.cache = False
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_epochs = 150.0
  config.optimizer.name = 'rmsprop'
  # TF-slim's 0.045 for batch 96, scaled linearly to the global batch.
  config.optimizer.learning_rate = 0.045 * config.batch_size / 96
  config.optimizer.momentum = 0.9
  config.optimizer.rmsprop_decay = 0.9
  config.optimizer.rmsprop_epsilon = 1.0
  config.optimizer.weight_decay = 4e-5
  config.schedule.name = 'exponential'
  config.schedule.warmup_epochs = 5.0
  config.schedule.decay_rate = 0.94
  config.schedule.decay_epochs = 2.5
  config.label_smoothing = 0.1
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
