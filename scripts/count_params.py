"""Prints the per-layer parameter and mult-add table of a MobileNet variant.

  python3 scripts/count_params.py --config configs/imagenet.py
  python3 scripts/count_params.py --config configs/imagenet.py --config.model.name=mobilenet_v3_small
  python3 scripts/count_params.py --config configs/cifar10.py --config.model.width_multiplier=0.5 --json
  python3 scripts/count_params.py --example   # the design notes' 5x5x3 -> 4 example
"""
import json

from absl import flags
from ml_collections import config_flags

from mobilenet.training import config_base
from mobilenet.models import counting
from mobilenet import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, errors.CONFIG_HELP, lock_config=True)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')
_EXAMPLE = flags.DEFINE_bool('example', False, "Print the design notes' standard vs separable example.")


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; pass settings as --config.x=y')
  if _EXAMPLE.value:
    example = counting.design_notes_example()
    print(json.dumps(example) if _JSON.value else counting.format_design_notes_example(example))
    return
  if _CONFIG.value is None:
    raise errors.UserError('no config given; pass --config configs/<file>.py (or --example)')
  config = _CONFIG.value
  config_base.validate(config)
  specs = counting.model_layer_specs(config)
  if _JSON.value:
    print(json.dumps({**counting.totals(specs).as_dict(),
                      'layers': [{'name': s.name, 'type': s.kind, 'kernel_shape': s.kernel_shape,
                                  'output_size': s.out_size, 'params': s.params,
                                  'mult_adds': s.mult_adds} for s in specs]}))
  else:
    model = config.model
    conv = '' if model.conv_type == 'separable' else f', {model.conv_type} convolutions'
    print(f'{model.name}, {model.form} form, alpha {model.width_multiplier}, resolution '
          f'{model.resolution}{conv}, {model.num_classes} classes\n')
    print(counting.format_table(specs))


if __name__ == '__main__':
  errors.run(main)
