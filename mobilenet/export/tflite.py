"""Flax model -> TFLite flatbuffer: jax2tf, then TensorFlow's TFLiteConverter.

jax2tf serializes the function as StableHLO inside a TF graph (XlaCallModule);
the TFLite converter lowers that StableHLO to TFLite builtins (CONV_2D,
DEPTHWISE_CONV_2D, HARD_SWISH, ...), with BatchNorm already folded into the
convolutions (export/fold_batch_norm.py). The input has a fixed batch of one
image, the case on-device inference runs.

With `calibration` (an iterable of float32 images shaped like the input, from
export/calibration.py) the model is quantized after training to int8: weights
per output channel, activations per tensor with ranges measured on those
images, every op an int8 builtin (conversion fails rather than leaving a float
op behind). Input and output stay float32: a QUANTIZE op at the start and a
DEQUANTIZE at the end, so callers feed the same images either way.
"""
from typing import Callable, Iterable

import numpy as np


def _tf_function(apply_fn: Callable, input_shape: tuple[int, ...]):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  converted = jax2tf.convert(apply_fn, with_gradient=False)
  return tf.function(converted, autograph=False,
                     input_signature=[tf.TensorSpec(input_shape, tf.float32, name='images')])


def convert(apply_fn: Callable, image_shape: tuple[int, int, int],
            calibration: Iterable[np.ndarray] | None = None) -> bytes:
  """The .tflite bytes of `apply_fn(images [1, H, W, C]) -> logits`; int8 with `calibration`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  function = _tf_function(apply_fn, (1, *image_shape))
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [function.get_concrete_function()], function)
  if calibration is not None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  return converter.convert()
