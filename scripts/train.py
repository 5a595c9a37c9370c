r"""Trains a MobileNetV1 variant from a config file; rerun the same command to resume.

  python3 scripts/train.py --config configs/default.py --workdir runs/default
  python3 scripts/train.py --config configs/cifar10.py --workdir runs/c10_half \
      --config.model.width_multiplier=0.5

Multi-host: pass --distributed on every host (JAX detects Cloud TPU, SLURM and
Open MPI clusters), or name the coordinator explicitly with
--coordinator_address, --num_processes and --process_id.
"""

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags
from ml_collections import config_flags

from mobilenet import compilation_cache, errors
from mobilenet.training import parallel, train

_CONFIG = config_flags.DEFINE_config_file('config', None, errors.CONFIG_HELP,
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints and metrics.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Join a multi-host run (jax.distributed).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
errors.mark_required(['config', 'workdir'])


def main(argv):
  compilation_cache.enable()  # Before anything compiles.
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; pass settings as --config.x=y')
  if _DISTRIBUTED.value or _COORDINATOR.value:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  errors.run(main)
