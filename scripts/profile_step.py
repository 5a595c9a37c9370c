"""Where the real training (or eval) step's time goes, per kind of layer, from a profile of the compiled step.

  python3 scripts/profile_step.py --config configs/cifar10.py --config.model.name=mobilenet_v2
  python3 scripts/profile_step.py --config configs/imagenet.py --config.batch_size=16 --json
  python3 scripts/profile_step.py --config configs/cifar10.py --step=eval

Profiles the project's jitted training step (--step=eval: its eval step, fused
inference included when the config asks for it) on synthetic batches and gives each
operation to the layer kind that emitted it (mobilenet/bench/step_profile.py):
milliseconds per step, share and GFLOP/s per kind, and the whole step's model
arithmetic against a large matrix product's GFLOP/s on this machine (the ceiling).
"""
import json

from mobilenet import malloc_tuning

malloc_tuning.reexec_with_tuned_malloc()  # Before JAX allocates (see its docstring).

from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mobilenet import compilation_cache, errors
from mobilenet.bench import step_profile
from mobilenet.training import config_base

config_flags.DEFINE_config_file('config', None, errors.CONFIG_HELP, lock_config=True)
errors.mark_required(['config'])
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed and profiled steps.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
_STEP = flags.DEFINE_enum('step', 'train', ['train', 'eval'], 'Which step to profile.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; pass settings as --config.x=y')
  config = flags.FLAGS.config
  config_base.validate(config)
  compilation_cache.enable()
  profile = step_profile.profile_train_step(config, warmup=_WARMUP.value, steps=_STEPS.value,
                                           step=_STEP.value)
  profile['matmul_ceiling_gflop_s'] = round(step_profile.matmul_ceiling(), 1)
  print(json.dumps(profile) if _JSON.value else
        step_profile.format_profile(profile, profile['matmul_ceiling_gflop_s']), flush=True)


if __name__ == '__main__':
  errors.run(main)
