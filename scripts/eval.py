"""Evaluates runs on the whole test split and compares accuracy with parameters and mult-adds.

  python3 scripts/eval.py --workdir runs/a runs/b
  python3 scripts/eval.py --workdir 'runs/sweep/*' --output runs/sweep

Prints a Markdown table sorted by parameters; writes results.csv, results.jsonl,
accuracy_vs_params.png, accuracy_vs_mult_adds.png and TensorBoard scalars
(step = parameter count) to --output (default: the workdirs' parent folder).
Runs with an exported model (scripts/export.py) in their folder, or all with
--latency, also get single-image latency columns and accuracy_vs_latency.png.
"""

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags

from mobilenet import compilation_cache, errors
from mobilenet.experiments import evaluate

_WORKDIR = flags.DEFINE_multi_string(
    'workdir', None, 'Run folders or globs; repeat the flag or list them after it.')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the results (default: the common '
                              'parent folder of the workdirs).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, "TFDS data dir, instead of each run's "
                                'config.data_dir (when evaluating on another machine).')
_LATENCY = flags.DEFINE_bool('latency', False, 'Time every run on an exported model (runs with a '
                              '*.tflite / *.onnx in their folder are timed anyway; the others get '
                              'a float .tflite exported to a temporary folder).')
errors.mark_required(['workdir'])


def main(argv):
  compilation_cache.enable()  # Before anything compiles.
  # Shell-expanded globs arrive as extra arguments after the first --workdir value.
  table, results = evaluate.evaluate_runs(_WORKDIR.value + argv[1:], _OUTPUT.value,
                                          _DATA_DIR.value, _LATENCY.value)
  print(table)
  if not any(result.top1 is not None for result in results):
    raise errors.UserError(f'none of the {len(results)} workdirs could be evaluated (see the '
                           'status column); check the paths and that the runs have checkpoints')


if __name__ == '__main__':
  errors.run(main)
