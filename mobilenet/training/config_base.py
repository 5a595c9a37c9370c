"""The fields every config shares, with their defaults.

Each file in `configs/` starts from `base_config()` and changes what its
experiment needs, so sweeps, tools and the trainer can rely on one schema.
Every number a researcher may change lives here; `validate` rejects bad
values with a one-line `UserError` before any work starts.
"""
import importlib.util
import pathlib
import types

import ml_collections

from mobilenet.errors import UserError

DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012')
FORMS = ('imagenet', 'cifar')
CONV_TYPES = ('separable', 'standard')
ACTIVATIONS = ('relu', 'relu6')
DTYPES = ('float32', 'bfloat16')
OPTIMIZERS = ('sgd', 'rmsprop', 'adamw')
SCHEDULES = ('constant', 'cosine', 'exponential')
NORMALIZATIONS = ('dataset', 'minus_one_to_one')
# Beyond any MobileNet anyone trains (16384 channels; 4096 px): a typo, refused before counting.
MAX_WIDTH_MULTIPLIER = 16.0
MAX_RESOLUTION = 4096


def sibling_config(config_file: str, name: str) -> types.ModuleType:
  """Imports the config file `name`.py from the folder of `config_file` (its __file__).

  For configs that build on another: config files are loaded by path, not as a
  package, so `from configs import default` would work only where the
  repository's root happens to be on sys.path (not for `python3 scripts/X.py`).
  """
  path = pathlib.Path(config_file).with_name(f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'mobilenet_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def base_config() -> ml_collections.ConfigDict:
  """Returns the full config schema with defaults for a small Fashion-MNIST run."""
  config = ml_collections.ConfigDict()
  config.dataset = 'fashion_mnist'
  # None: TFDS's default (the TFDS_DATA_DIR variable, else ~/tensorflow_datasets).
  # May be a local path or gs://bucket/path.
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.seed = 0

  config.batch_size = 128  # Global, over all devices and hosts.
  config.eval_batch_size = 500  # Global; the last batch is padded and masked.
  config.num_epochs = 10.0
  config.num_train_steps = -1  # -1: from num_epochs.
  config.log_every_steps = 100
  config.eval_every_steps = -1  # -1: once per epoch and at the end.
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3

  config.model = ml_collections.ConfigDict()
  # mobilenet_v1, mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small, or the
  # V3 *_minimalistic variants (models/architectures.py has the tables).
  config.model.name = 'mobilenet_v1'
  config.model.form = 'cifar'  # 'imagenet': stem stride 2 (224 input); 'cifar': stem stride 1.
  config.model.width_multiplier = 1.0  # alpha in the paper.
  config.model.resolution = 28  # Input side; rho = resolution / 224 in the imagenet form.
  config.model.num_classes = 10
  # 'standard': MobileNetV1 paper's "Conv MobileNet" (Table 4); V1 only.
  config.model.conv_type = 'separable'
  # MobileNetV1's: 'relu' (the paper) or 'relu6' (the released TF checkpoints).
  # V2 and V3 use the activations of their tables.
  config.model.activation = 'relu'
  config.model.dropout_rate = 0.0
  config.model.dtype = 'float32'  # Compute dtype; parameters stay float32.
  # The modules the network is built with (ops/op_sets.py): 'fast' (the fastest
  # kernel per layer kind on the backend) or 'plain' (nn.Conv and nn.BatchNorm).
  # Both compute the same function; neither changes the parameters.
  config.model.ops = 'fast'
  # The 'fast' ops' depthwise kernel: 'auto' (fastest measured on the backend,
  # ops/select.py), 'xla', 'shifted' or 'cpu_kernel'.
  config.model.depthwise_implementation = 'auto'
  # Evaluate with the BatchNorms fused into the C++ depthwise and pointwise kernels where the
  # model allows it (models/fused_inference.py: every architecture but Conv
  # MobileNet, float32, the fast ops on the CPU).
  config.model.fused_inference = True
  # Train with every BatchNorm + activation that feeds only a depthwise layer
  # (a V2/V3 expansion's, V1's between blocks, the stem's into a first block
  # without expansion) computed inside the C++ depthwise kernel
  # (ops/norm_depthwise.py: float32, the fast ops on the CPU); false: as two
  # layers. Same function and parameters either way.
  config.model.fused_training = True
  config.model.min_channels = 8  # Channels are max(int(c * alpha), min_channels).
  config.model.batch_norm_momentum = 0.9
  config.model.batch_norm_epsilon = 1e-3

  config.input = ml_collections.ConfigDict()
  config.input.channels = 1  # Grayscale data is repeated to 3 channels when this is 3.
  # How pixels are scaled: 'dataset' ((x / 255 - mean) / std with the dataset's statistics)
  # or 'minus_one_to_one' (x / 127.5 - 1, what keras.applications' MobileNets and TF-slim's
  # released checkpoints were trained on: imported weights expect it).
  config.input.normalization = 'dataset'
  config.input.random_crop_padding = 0  # CIFAR-style: pad by this much, then crop back.
  config.input.random_flip = False  # Horizontal flips.
  config.input.min_crop_area = 0.25  # ImageNet random-resized-crop: smallest area fraction.
  config.input.eval_crop_fraction = 0.875  # ImageNet center crop.
  config.input.shuffle_buffer = 16_384
  config.input.cache = True  # Cache decoded examples in memory (small datasets).
  config.input.prefetch_batches = 2

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1  # Peak learning rate, for the global batch size.
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.rmsprop_decay = 0.9
  config.optimizer.rmsprop_epsilon = 1.0
  config.optimizer.adam_b1 = 0.9
  config.optimizer.adam_b2 = 0.999
  config.optimizer.weight_decay = 5e-4
  # The paper puts little or no decay on depthwise filters; BatchNorm and biases never decay.
  config.optimizer.decay_depthwise = False
  config.optimizer.grad_clip_norm = 0.0  # 0: no clipping.

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'cosine'
  config.schedule.warmup_epochs = 0.5
  config.schedule.decay_rate = 0.94  # 'exponential': multiply by this ...
  config.schedule.decay_epochs = 2.5  # ... every this many epochs (TF-slim's recipe).

  config.label_smoothing = 0.0
  # '' (off), or a run folder to start from (training/init_from.py): its newest checkpoint's
  # weights and BatchNorm statistics (EMA ones when it kept them) with this config's
  # classifier where the class count differs and the stem adapted to this input's channels;
  # step, optimizer state and data position start fresh. Its architecture must match. Only
  # read when the workdir holds no checkpoint: a resume continues its own run.
  config.init_from = ''
  # 0: none. Else an exponential moving average of the weights and BatchNorm statistics
  # (decay min(ema_decay, (1 + step) / (10 + step)), TensorFlow's); eval uses it.
  config.ema_decay = 0.0
  return config


def _require(condition: bool, field: str, value, requirement: str) -> None:
  """Raises a one-line UserError naming the field, its value and the fix."""
  if not condition:
    raise UserError(f'config.{field}={value!r} {requirement}; '
                    f'fix it in the config file or pass --config.{field}=<value>')


def _require_choice(config: ml_collections.ConfigDict, field: str, choices) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  _require(value in choices, field, value, f'is not one of {", ".join(map(str, choices))}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field a run depends on; raises UserError on the first bad one."""
  # Here, not at the top: keeps the schema import-light.
  from mobilenet.models import architectures
  from mobilenet.ops import depthwise, op_sets
  _require_choice(config, 'dataset', DATASETS)
  _require_choice(config, 'model.name', architectures.NAMES)
  _require_choice(config, 'model.ops', op_sets.OP_SETS)
  _require_choice(config, 'model.form', FORMS)
  _require_choice(config, 'model.conv_type', CONV_TYPES)
  _require_choice(config, 'model.activation', ACTIVATIONS)
  _require_choice(config, 'model.dtype', DTYPES)
  _require_choice(config, 'model.depthwise_implementation', ('auto',) + depthwise.IMPLEMENTATIONS)
  _require_choice(config, 'optimizer.name', OPTIMIZERS)
  _require_choice(config, 'schedule.name', SCHEDULES)
  _require_choice(config, 'input.channels', (1, 3))
  _require_choice(config, 'input.normalization', NORMALIZATIONS)
  model = config.model
  _require(model.conv_type == 'separable' or model.name == 'mobilenet_v1', 'model.conv_type',
           model.conv_type, f"is MobileNetV1's Conv MobileNet baseline, not {model.name}'s; use "
           "'separable' or --config.model.name=mobilenet_v1")
  _require(model.width_multiplier > 0, 'model.width_multiplier', model.width_multiplier,
           'must be > 0 (the paper uses 1.0, 0.75, 0.5, 0.25)')
  _require(model.resolution >= 8, 'model.resolution', model.resolution,
           'must be at least 8 pixels (the paper uses 224, 192, 160, 128)')
  _require(model.width_multiplier <= MAX_WIDTH_MULTIPLIER, 'model.width_multiplier',
           model.width_multiplier, f'must be at most {MAX_WIDTH_MULTIPLIER:g}')
  _require(model.resolution <= MAX_RESOLUTION, 'model.resolution', model.resolution,
           f'must be at most {MAX_RESOLUTION} pixels')
  _require(model.num_classes >= 2, 'model.num_classes', model.num_classes, 'must be at least 2')
  _require(model.min_channels >= 1, 'model.min_channels', model.min_channels, 'must be >= 1')
  _require(0 <= model.dropout_rate < 1, 'model.dropout_rate', model.dropout_rate,
           'must be in [0, 1)')
  _require(0 < model.batch_norm_momentum < 1, 'model.batch_norm_momentum',
           model.batch_norm_momentum, 'must be in (0, 1)')
  _require(model.batch_norm_epsilon > 0, 'model.batch_norm_epsilon', model.batch_norm_epsilon,
           'must be > 0')
  for field in ('batch_size', 'eval_batch_size', 'keep_checkpoints'):
    _require(config[field] >= 1, field, config[field], 'must be a positive integer')
  _require(config.num_train_steps > 0 or (config.num_train_steps == -1 and config.num_epochs > 0),
           'num_train_steps', config.num_train_steps,
           'must be > 0, or -1 with config.num_epochs > 0')
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    _require(config[field] >= 1 or config[field] == -1, field, config[field],
             'must be a positive number of steps (or -1 for the default)')
  optimizer = config.optimizer
  _require(optimizer.learning_rate > 0, 'optimizer.learning_rate', optimizer.learning_rate,
           'must be > 0')
  _require(optimizer.weight_decay >= 0, 'optimizer.weight_decay', optimizer.weight_decay,
           'must be >= 0')
  _require(optimizer.grad_clip_norm >= 0, 'optimizer.grad_clip_norm', optimizer.grad_clip_norm,
           'must be >= 0 (0 turns clipping off)')
  _require(0 <= optimizer.momentum < 1, 'optimizer.momentum', optimizer.momentum,
           'must be in [0, 1)')
  _require(config.schedule.warmup_epochs >= 0, 'schedule.warmup_epochs',
           config.schedule.warmup_epochs, 'must be >= 0')
  _require(0 < config.schedule.decay_rate <= 1, 'schedule.decay_rate', config.schedule.decay_rate,
           'must be in (0, 1]')
  _require(config.schedule.decay_epochs > 0, 'schedule.decay_epochs', config.schedule.decay_epochs,
           'must be > 0')
  _require(0 <= config.label_smoothing < 1, 'label_smoothing', config.label_smoothing,
           'must be in [0, 1)')
  _require(0 <= config.ema_decay < 1, 'ema_decay', config.ema_decay,
           'must be in [0, 1) (0 turns the moving average off)')
  _require(0 < config.input.min_crop_area <= 1, 'input.min_crop_area', config.input.min_crop_area,
           'must be in (0, 1]')
  _require(0 < config.input.eval_crop_fraction <= 1, 'input.eval_crop_fraction',
           config.input.eval_crop_fraction, 'must be in (0, 1]')
  _require(config.input.random_crop_padding >= 0, 'input.random_crop_padding',
           config.input.random_crop_padding, 'must be >= 0')


def with_defaults(recorded: dict) -> dict:
  """A config recorded in a run's config.json, with fields added to the schema since at their defaults."""
  config = base_config().to_dict()
  _update_nested(config, recorded)
  return config


def _update_nested(target: dict, source: dict) -> None:
  for key, value in source.items():
    if isinstance(value, dict) and isinstance(target.get(key), dict):
      _update_nested(target[key], value)
    else:
      target[key] = value
