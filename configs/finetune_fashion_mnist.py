"""Fine-tuning ImageNet weights on Fashion-MNIST: MobileNetV1 0.25 at 128x128, the size they know.

  python3 scripts/import_weights.py --config configs/imagenet.py:0.25,128 \
      --keras_weights imagenet --workdir runs/keras_mobilenet_v1_0.25_128
  python3 scripts/train.py --config configs/finetune_fashion_mnist.py --workdir runs/finetune_fmnist

The first command turns keras.applications' MobileNet 0.25/128 ImageNet
weights (mobilenet_2_5_128_tf.h5; offline: download it elsewhere and pass its
path to --keras_weights) into a run folder; the second starts from it
(config.init_from): backbone and BatchNorm statistics from ImageNet, the
1000-class classifier replaced by a fresh 10-class one, the stem's RGB kernel
summed for the grayscale images, which are upsampled from 28 to 128 and
scaled to [-1, 1] as the weights were trained. Other weights: change
init_from, and the model fields to the ones its config.json has (name, width,
resolution; V1's ReLU6). The optional argument after ':' is the run folder to
start from.
Expected: not measured (no machine this was written on could download the
weights); from-scratch V1 runs on 28x28 reach 89.8-91.2% in 2-9 epochs
(README).
Cost: 2 epochs of 468 steps at 128x128 (12.7 M mult-adds per image, 4.4x the
default config's): 73-95 img/s training on a 2-core Intel Xeon VM shared with
other jobs (load ~10; 2026-11-30, 60 steps with random Keras weights), so about
25 minutes there, plus 40 s compiling and 2 evaluations.
"""
from mobilenet.training.config_base import base_config


def get_config(init_from=None):
  """V1 0.25/128 in the ImageNet form, from the run folder `init_from`, on Fashion-MNIST."""
  config = base_config()
  config.init_from = init_from or 'runs/keras_mobilenet_v1_0.25_128'
  config.dataset = 'fashion_mnist'
  config.model.name = 'mobilenet_v1'
  config.model.form = 'imagenet'  # As the weights were trained: stem stride 2 ...
  config.model.width_multiplier = 0.25
  config.model.resolution = 128  # ... at the side they were trained at.
  config.model.activation = 'relu6'  # Keras' and TF-slim's V1.
  config.model.num_classes = 10
  config.input.channels = 1  # The stem kernel is summed over RGB (training/init_from.py).
  config.input.normalization = 'minus_one_to_one'
  config.input.random_flip = True
  config.batch_size = 128
  config.num_epochs = 2.0
  # A tenth of the from-scratch rate: the backbone only needs adjusting.
  config.optimizer.learning_rate = 0.01
  config.optimizer.weight_decay = 4e-5
  config.schedule.name = 'cosine'
  config.schedule.warmup_epochs = 0.1
  config.checkpoint_every_steps = 200
  return config
