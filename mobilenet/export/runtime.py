"""Running an exported model without JAX: the LiteRT interpreter for .tflite, onnxruntime for .onnx.

`load(path, num_threads)` returns a `Predictor`: `predictor(images)` maps
float32 images [N, H, W, C] to float32 logits [N, classes], one image per call
of the runtime (the models are exported with a batch of one).
"""
import os
from typing import Callable

import numpy as np

from mobilenet.errors import UserError

FORMATS = ('tflite', 'onnx')


def format_of(path: str) -> str:
  """'tflite' or 'onnx', from the file's extension."""
  extension = os.path.splitext(path)[1].lstrip('.').lower()
  if extension not in FORMATS:
    raise UserError(f'{path}: unknown model format {extension!r}; name the file *.tflite or *.onnx')
  return extension


class Predictor:
  """Logits of an exported model; `run_one(image [1, H, W, C])` is a single runtime call."""

  def __init__(self, run_one: Callable[[np.ndarray], np.ndarray], input_shape: tuple[int, ...]):
    self.run_one = run_one
    self.input_shape = tuple(input_shape)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    return np.concatenate([self.run_one(images[i:i + 1]) for i in range(len(images))])


def _tflite(path: str, num_threads: int | None) -> Predictor:
  from ai_edge_litert import interpreter  # pylint: disable=import-outside-toplevel
  runtime = interpreter.Interpreter(model_path=path, num_threads=num_threads)
  runtime.allocate_tensors()
  (model_input,), (model_output,) = runtime.get_input_details(), runtime.get_output_details()

  def run_one(image):
    runtime.set_tensor(model_input['index'], image)
    runtime.invoke()
    return runtime.get_tensor(model_output['index'])

  return Predictor(run_one, model_input['shape'])


def _onnx(path: str, num_threads: int | None) -> Predictor:
  import onnxruntime  # pylint: disable=import-outside-toplevel
  options = onnxruntime.SessionOptions()
  if num_threads:
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
  session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  (model_input,) = session.get_inputs()

  def run_one(image):
    return session.run(None, {model_input.name: image})[0]

  return Predictor(run_one, model_input.shape)


def load(path: str, num_threads: int | None = None) -> Predictor:
  """The exported model at `path`, on `num_threads` CPU threads (None: the runtime's default)."""
  model_format = format_of(path)
  if not os.path.isfile(path):
    raise UserError(f'{path}: no such model file; write one with scripts/export.py')
  return (_tflite if model_format == 'tflite' else _onnx)(path, num_threads)
