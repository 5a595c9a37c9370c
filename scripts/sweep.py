r"""Trains a grid of variants, one workdir each, then compares them (scripts/eval.py's outputs).

  python3 scripts/sweep.py --config configs/fashion_mnist_width_sweep.py --workdir runs/width \
      --sweep model.width_multiplier=0.25,0.5,0.75,1.0
  python3 scripts/sweep.py --config configs/default.py --workdir runs/grid \
      --sweep model.width_multiplier=0.25,0.5 --sweep model.resolution=28,20 \
      --config.num_epochs=1
  python3 scripts/sweep.py --config configs/fashion_mnist_width_sweep.py --workdir runs/width --dry_run

Several --sweep flags give their product; without one, the config's `sweep`
field is the grid. Other --config.x=y flags apply to every variant. Rerun the
same command to resume: finished variants are skipped. --dry_run prints one
scripts/train.py command per variant (for a cluster scheduler) and runs nothing.
Exits non-zero when a variant failed, after training and evaluating the others.
"""

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags
from ml_collections import config_flags

from mobilenet import compilation_cache, errors
from mobilenet.experiments import sweep

_CONFIG = config_flags.DEFINE_config_file('config', None, errors.CONFIG_HELP,
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, "The sweep's folder; variants train in "
                               'subfolders named after their overrides.')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'field=v1,v2,...: one axis of the grid.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the per-variant commands; run nothing.')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the comparison (default: --workdir).')
errors.mark_required(['config', 'workdir'])


def main(argv):
  compilation_cache.enable()  # Before anything compiles.
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; pass settings as --config.x=y')
  config_flag = flags.FLAGS['config']
  failed = sweep.run_sweep(_CONFIG.value, config_flag.config_filename, _WORKDIR.value,
                           _SWEEP.value, config_flag.override_values, _DRY_RUN.value,
                           _OUTPUT.value)
  if failed:
    raise errors.UserError(f'{len(failed)} variant(s) failed: '
                           f'{", ".join(v.workdir.name for v in failed)}; see their logs above, '
                           'fix, and rerun the same command to resume')


if __name__ == '__main__':
  errors.run(main)
