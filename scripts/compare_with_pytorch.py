r"""This project against PyTorch eager: train and eval images/second of the same networks, interleaved.

  bash scripts/setup_torch_reference.sh     # once: .venv-torch with a pinned torch
  python3 scripts/compare_with_pytorch.py --forms=cifar,imagenet --output docs/results/pytorch_comparison
  python3 scripts/compare_with_pytorch.py --forms=cifar --architectures=mobilenet_v2 \
      --width_multipliers=0.5,1.0 --rounds=1 --steps=2

Per form (cifar: 32x32, batch 128; imagenet: 224x224, batch 16), architecture and width
multiplier: scripts/torch_reference.py in .venv-torch and scripts/benchmark.py here, alternating,
--rounds times each, both on the same --threads CPUs, float32, channels-last on the PyTorch side.
Refuses (one line, exit 2) to compare networks whose parameter or BatchNorm-statistic counts
differ. Prints progress, then a Markdown table of the medians and ours / PyTorch; --output PATH
also writes PATH.csv and PATH.json (the machine, the rows and every measurement).
"""
from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # The benchmark it starts re-executes itself anyway.

import pathlib  # pylint: disable=g-import-not-at-top

from absl import flags  # pylint: disable=g-import-not-at-top

from mobilenet import errors  # pylint: disable=g-import-not-at-top
from mobilenet.bench import torch_comparison  # pylint: disable=g-import-not-at-top

_FORMS = flags.DEFINE_list('forms', ['cifar', 'imagenet'], 'cifar (32x32, batch 128) and/or '
                           'imagenet (224x224, batch 16).')
_ARCHITECTURES = flags.DEFINE_list('architectures', list(torch_comparison.ARCHITECTURES),
                                   'Architectures (config.model.name values).')
_WIDTH_MULTIPLIERS = flags.DEFINE_list('width_multipliers', ['1.0'], 'Width multipliers (alpha).')
_THREADS = flags.DEFINE_integer('threads', 2, 'CPUs (and threads) each side runs on.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Measurements per side and setting, interleaved.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps per measurement.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per measurement; the median is kept.')
_TORCH_PYTHON = flags.DEFINE_string('torch_python', str(torch_comparison.DEFAULT_TORCH_PYTHON),
                                    "The PyTorch environment's interpreter.")
_TORCH_MALLOC = flags.DEFINE_enum(
    'torch_malloc', 'as_installed', list(torch_comparison.TORCH_MALLOC),
    "PyTorch's side with the malloc its users get (as_installed), with the glibc settings this "
    "project's CLIs give themselves (tuned, mobilenet/malloc_tuning.py), or both, in the same "
    'rounds.')
_PROFILE = flags.DEFINE_bool('profile', False, 'Also profile each setting\'s training step on both '
                             'sides and print milliseconds per kind of layer.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write OUTPUT.csv and OUTPUT.json.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; see --help')
  try:
    widths = [float(value) for value in _WIDTH_MULTIPLIERS.value]
  except ValueError as error:
    raise errors.UserError(f'--width_multipliers: {error}; pass numbers, e.g. 0.5,1.0') from None
  settings = torch_comparison.settings_grid(_FORMS.value, _ARCHITECTURES.value, widths)
  torch_comparison.compare(
      settings, threads=_THREADS.value, rounds=_ROUNDS.value, warmup=_WARMUP.value,
      steps=_STEPS.value, torch_python=pathlib.Path(_TORCH_PYTHON.value),
      output=pathlib.Path(_OUTPUT.value) if _OUTPUT.value else None, profile=_PROFILE.value,
      torch_malloc=_TORCH_MALLOC.value,
      log=lambda line: print(line, flush=True))


if __name__ == '__main__':
  errors.run(main)
