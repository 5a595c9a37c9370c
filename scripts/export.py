r"""Exports a trained run to a model file that runs without JAX (LiteRT / TFLite or onnxruntime).

  python3 scripts/export.py --workdir runs/default --format tflite --output runs/default/model.tflite
  python3 scripts/export.py --workdir runs/default --format tflite --quantize int8 \
      --output runs/default/model_int8.tflite --evaluate

BatchNorms are folded into the convolutions; int8 is calibrated on the run's
own training batches. Prints the file's size and how close its logits are to
the JAX model's; with --evaluate also both top-1 accuracies on the test split.
"""

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags

from mobilenet import errors
from mobilenet.export import export_run

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run folder (scripts/train.py --workdir).')
_FORMAT = flags.DEFINE_enum('format', None, ['tflite', 'onnx'], 'What to write.')
_OUTPUT = flags.DEFINE_string('output', None, 'The model file: *.tflite or *.onnx.')
_QUANTIZE = flags.DEFINE_enum('quantize', 'none', list(export_run.QUANTIZATIONS),
                              'int8: post-training quantization, per-channel weights.')
_CALIBRATION_BATCHES = flags.DEFINE_integer(
    'calibration_batches', 8, 'Training batches (of config.batch_size) that int8 calibrates on.')
_EVALUATE = flags.DEFINE_bool('evaluate', False, "Also report the exported and the JAX model's "
                              'top-1 on the whole test split.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, "TFDS data dir, instead of the run's "
                                'config.data_dir.')
errors.mark_required(['workdir', 'format', 'output'])


def main(argv):
  del argv
  report = export_run.export_run(_WORKDIR.value, _OUTPUT.value, _FORMAT.value, _QUANTIZE.value,
                                 _CALIBRATION_BATCHES.value, _EVALUATE.value, _DATA_DIR.value)
  print(f'wrote {report.output}: {report.format} {report.quantize}, {report.bytes:,} bytes, '
        f'{report.seconds:.1f} s; step {report.step} ({"EMA" if report.ema else "trained"} '
        f'weights)')
  print(f'logits vs JAX on the first test batch: max relative error '
        f'{report.max_relative_error:.2e}, same top-1 class {100 * report.argmax_agreement:.2f}%')
  if report.top1 is not None:
    print(f'test top-1: exported {100 * report.top1:.2f}%, JAX {100 * report.jax_top1:.2f}% '
          f'({100 * (report.top1 - report.jax_top1):+.2f} points)')


if __name__ == '__main__':
  errors.run(main)
