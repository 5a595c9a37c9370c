"""Calibration images for post-training quantization: the run's own training batches.

Quantization ranges should be measured on what the model sees in training, so
the images come from the run's input pipeline and config
(`input_pipeline.create_train_iterator`): the same normalization, resolution
and channels, in the order the run's first steps read them (augmentation
included when the config has it).
"""
from typing import Iterator

import ml_collections
import numpy as np


def training_images(config: ml_collections.ConfigDict, num_batches: int) -> Iterator[np.ndarray]:
  """The images of the run's first `num_batches` training batches, one float32 [H, W, C] at a time."""
  from mobilenet.data import input_pipeline  # pylint: disable=import-outside-toplevel
  batches = input_pipeline.create_train_iterator(config)
  for _ in range(num_batches):
    for image in next(batches)['image']:
      yield np.asarray(image, np.float32)
