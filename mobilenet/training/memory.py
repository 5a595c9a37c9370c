"""How much memory a config needs to train, estimated from the layer table before compiling.

XLA reports an allocation it cannot make by aborting (or, on the CPU, by the
machine swapping until something is killed), after minutes of compiling. The
layer table (counting.py) gives every layer's parameters and output size, so
the need can be bounded first and a config that cannot fit refused with one
line naming the fields to lower.
"""
import os

import jax
import ml_collections

from mobilenet.errors import UserError
from mobilenet.models import counting

# Parameter-sized float32 buffers alive during a step: parameters, gradients, updates, and up
# to two optimizer slots (RMSprop, AdamW), plus the EMA copy when there is one.
_PARAMETER_COPIES = 5
# Activation-sized buffers kept per layer output for the backward pass: at least the
# convolution's output and the activation's (XLA fuses BatchNorm in between). Kept low on
# purpose: the estimate must never refuse a config that fits.
_ACTIVATION_COPIES = 2


def training_bytes(config: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                   devices: int) -> int:
  """A low estimate of the peak memory of one device during a training step."""
  specs = counting.model_layer_specs(config)
  totals = counting.totals(specs)
  state = 4 * (_PARAMETER_COPIES + (1 if config.ema_decay > 0 else 0)) * totals.params
  state += 4 * totals.batch_stats
  per_example = sum(spec.out_size * spec.out_size * spec.out_channels for spec in specs)
  dtype_bytes = 2 if config.model.dtype == 'bfloat16' else 4
  train_batch = -(-config.batch_size // devices)
  eval_batch = -(-config.eval_batch_size // devices)
  image = 4
  for side in image_shape:
    image *= side
  train = train_batch * (_ACTIVATION_COPIES * dtype_bytes * per_example + image)
  # Eval keeps no activations for a backward pass: the largest two layers at a time.
  largest = max(spec.out_size * spec.out_size * spec.out_channels for spec in specs)
  evaluation = eval_batch * (2 * dtype_bytes * largest + image)
  return state + max(train, evaluation)


def device_capacity() -> tuple[int | None, str]:
  """(bytes one local device may use, what that is), or (None, ...) when unknown.

  Accelerators report their limit; CPU devices share the host's RAM.
  """
  device = jax.local_devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    limit = stats.get('bytes_limit')
    return limit, f'each {device.device_kind} has'
  try:
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError):
    return None, 'unknown'
  return total // jax.local_device_count(), 'this machine has'


def check_fits(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> None:
  """Raises a one-line UserError when the estimate exceeds what a device can hold."""
  needed = training_bytes(config, image_shape, jax.device_count())
  capacity, holder = device_capacity()
  if capacity is None or needed <= capacity:
    return
  per_device = -(-config.batch_size // jax.device_count())
  raise UserError(
      f'training alpha {config.model.width_multiplier:g} at resolution {config.model.resolution} '
      f'with {per_device} examples per device needs about {needed / 2**30:.1f} GiB per device and '
      f'{holder} {capacity / 2**30:.1f} GiB; lower --config.batch_size, '
      '--config.model.resolution or --config.model.width_multiplier')
