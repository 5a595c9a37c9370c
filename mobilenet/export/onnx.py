"""TFLite -> ONNX with tf2onnx, and int8 ONNX with onnxruntime's static quantization.

jax2tf writes StableHLO inside a TF graph (XlaCallModule), which tf2onnx
cannot convert; it does convert the float .tflite that export/tflite.py
writes from that graph, op for op (docs/export.md: the converters measured).

Int8 ONNX is quantized by onnxruntime from the float ONNX model: QDQ format,
weights per output channel, activation ranges (min/max) measured on the
calibration images, as the TFLite path does.
"""
import os
import tempfile
from typing import Iterable

import numpy as np

OPSET = 17


def from_tflite(tflite_model: bytes) -> bytes:
  """The float ONNX model (bytes) of a float .tflite model."""
  import tf2onnx  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'model.tflite')
    with open(path, 'wb') as f:
      f.write(tflite_model)
    model_proto, _ = tf2onnx.convert.from_tflite(path, opset=OPSET)
  return model_proto.SerializeToString()


def quantize_int8(float_model: bytes, calibration: Iterable[np.ndarray]) -> bytes:
  """The int8 (QDQ, per-channel weights) ONNX model, its ranges calibrated on `calibration`."""
  import onnx  # pylint: disable=import-outside-toplevel
  from onnxruntime import quantization  # pylint: disable=import-outside-toplevel

  input_name = onnx.load_from_string(float_model).graph.input[0].name

  class Reader(quantization.CalibrationDataReader):
    def __init__(self):
      self._images = iter(calibration)

    def get_next(self):
      image = next(self._images, None)
      return None if image is None else {input_name: image[None]}

  with tempfile.TemporaryDirectory() as folder:
    source, target = os.path.join(folder, 'float.onnx'), os.path.join(folder, 'int8.onnx')
    with open(source, 'wb') as f:
      f.write(float_model)
    quantization.quant_pre_process(source, source)  # Shape inference and graph clean-up first.
    quantization.quantize_static(
        source, target, Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod.MinMax)
    with open(target, 'rb') as f:
      return f.read()
