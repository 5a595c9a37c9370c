"""Exports a trained run to a file that runs without JAX: .tflite or .onnx, float32 or int8.

`export_run(workdir, output, ...)` restores the run (export/from_run.py: the
weights eval uses), folds its BatchNorms into the convolutions
(export/fold_batch_norm.py), converts (export/tflite.py; ONNX through the float
.tflite, export/onnx.py), quantizes to int8 when asked with the run's own
training images as calibration (export/calibration.py), and writes the file
(through a temporary name, so a failure leaves no half-written model). It then
checks the file: its logits against the JAX model's on the first test batch,
and with `evaluate` its top-1 on the whole test split next to the JAX model's.
"""
import dataclasses
import os
import time

import jax
import numpy as np
from absl import logging

from mobilenet.errors import UserError
from mobilenet.export import accuracy, calibration, fold_batch_norm, from_run, runtime, tflite
from mobilenet.export import onnx as onnx_export

QUANTIZATIONS = ('none', 'int8')


@dataclasses.dataclass
class ExportReport:
  """What was written and how close it is to the JAX model."""
  output: str
  format: str
  quantize: str
  bytes: int
  seconds: float  # Restoring excluded: folding, conversion, quantization, writing.
  step: int
  ema: bool
  max_relative_error: float  # max |exported - JAX| / max |JAX| over the first test batch's logits.
  argmax_agreement: float  # Share of that batch where both pick the same class.
  top1: float | None = None  # The exported model on the whole test split (with `evaluate`).
  jax_top1: float | None = None  # The JAX model on the same images.


def relative_error(have: np.ndarray, want: np.ndarray) -> float:
  """max |have - want| / max |want|: the logits' error relative to their scale."""
  return float(np.max(np.abs(have - want)) / max(float(np.max(np.abs(want))), 1e-30))


def _check_arguments(output: str, fmt: str, quantize: str) -> None:
  if fmt not in runtime.FORMATS:
    raise UserError(f'--format {fmt}: unknown; choose one of {", ".join(runtime.FORMATS)}')
  if quantize not in QUANTIZATIONS:
    raise UserError(f'--quantize {quantize}: unknown; choose one of {", ".join(QUANTIZATIONS)}')
  if runtime.format_of(output) != fmt:
    raise UserError(f'--output {output} does not end in .{fmt}; name it *.{fmt} for --format {fmt}')
  folder = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(folder):
    raise UserError(f'--output {output}: no folder {folder}; create it first')


def convert(run: from_run.RestoredRun, fmt: str, quantize: str, calibration_batches: int) -> bytes:
  """The exported model's bytes."""
  folded_model, folded_params = fold_batch_norm.fold(run.model, run.variables)

  def apply_fn(images):
    return folded_model.apply({'params': folded_params}, images)

  def images():
    logging.info('calibrating int8 ranges on %d training batches of %d',
                 calibration_batches, run.config.batch_size)
    return calibration.training_images(run.config, calibration_batches)

  int8 = quantize == 'int8'
  if fmt == 'tflite':
    return tflite.convert(apply_fn, run.image_shape, images() if int8 else None)
  model = onnx_export.from_tflite(tflite.convert(apply_fn, run.image_shape))
  return onnx_export.quantize_int8(model, images()) if int8 else model


def export_run(workdir: str, output: str, fmt: str, quantize: str = 'none',
               calibration_batches: int = 8, evaluate: bool = False,
               data_dir: str | None = None) -> ExportReport:
  """Exports `workdir`'s run to `output` and checks it against the JAX model."""
  _check_arguments(output, fmt, quantize)
  if calibration_batches < 1:
    raise UserError(f'--calibration_batches {calibration_batches}: must be at least 1')
  run = from_run.restore(workdir, data_dir)
  logging.info('restored %s at step %d (%s weights)', workdir, run.step,
               'EMA' if run.ema else 'trained')
  started = time.perf_counter()
  model_bytes = convert(run, fmt, quantize, calibration_batches)
  partial = f'{output}.partial'
  with open(partial, 'wb') as f:
    f.write(model_bytes)
  os.replace(partial, output)
  seconds = time.perf_counter() - started
  logging.info('wrote %s (%d bytes) in %.1f s', output, len(model_bytes), seconds)

  from mobilenet.data import input_pipeline  # pylint: disable=import-outside-toplevel
  batch = next(input_pipeline.create_eval_iterator(run.config))
  images = np.asarray(batch['image'])[np.asarray(batch['mask'], bool)]
  want = np.asarray(jax.jit(lambda v, x: run.model.apply(v, x, train=False))(run.variables, images))
  predictor = runtime.load(output)
  have = predictor(images)
  report = ExportReport(
      output=output, format=fmt, quantize=quantize, bytes=len(model_bytes), seconds=seconds,
      step=run.step, ema=run.ema, max_relative_error=relative_error(have, want),
      argmax_agreement=float(np.mean(np.argmax(have, -1) == np.argmax(want, -1))))
  if evaluate:
    report.top1, _ = accuracy.top1(predictor, run.config)
    report.jax_top1, _ = accuracy.top1(_BatchPredictor(run), run.config)
  return report


class _BatchPredictor(runtime.Predictor):
  """The JAX model itself, whole batches per call, for the accuracy it is compared with."""

  def __init__(self, run: from_run.RestoredRun):
    apply = jax.jit(lambda x: run.model.apply(run.variables, x, train=False))
    super().__init__(lambda images: np.asarray(apply(images)), (1, *run.image_shape))

  def __call__(self, images):
    return self.run_one(np.asarray(images, np.float32))
