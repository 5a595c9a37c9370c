"""Quiet defaults for start-up messages of JAX, TensorFlow and TFDS that are harmless here.

Applied on `import mobilenet`, so before the scripts import JAX or TensorFlow,
and only where the user has not chosen: an environment variable already set
is left as it is.

* JAX_PLATFORMS=cpu when no accelerator plugin (CUDA, ROCm, TPU) is installed
  and there is no GPU or TPU on the PCI bus: otherwise JAX probes for a TPU and
  logs "Unable to initialize backend 'tpu': ... libtpu.so" on every CPU-only
  machine. Where there is accelerator hardware, JAX keeps choosing, and warns
  itself when its plugin is missing.
* TFDS's INFO lines ("Load dataset info from", "Constructing tf.data.Dataset",
  one set per eval) and two messages this project triggers by design:
  "Variant folder ... has no dataset_info.json" (a data dir where the dataset is
  not prepared yet: `input_pipeline.ensure_available` prepares it or fails
  with one line saying how) and "fields info.[module_name] differ on disk and
  in the code" (the offline Fashion-MNIST is written by a subclass of TFDS's
  builder, fashion_mnist_offline.py, under another module name; everything
  else is equal). TFDS's other warnings still show.

Not silenced: TensorFlow's "oneDNN custom operations are on" (twice, each
after "All log messages before absl::InitializeLog() ..."): its C++ prints it
while loading, before it reads any setting (TF_CPP_MIN_LOG_LEVEL included);
the README explains it.
"""
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import pkgutil

from absl import logging as absl_logging

_HARMLESS_TFDS_MESSAGES = ('has no dataset_info.json', 'info.[module_name] differ on disk')


def accelerator_plugins() -> list[str]:
  """JAX backends besides the CPU that are installed (JAX's plugin discovery, and libtpu)."""
  names = [entry.name for entry in importlib.metadata.entry_points(group='jax_plugins')]
  namespace = importlib.util.find_spec('jax_plugins')
  if namespace is not None and namespace.submodule_search_locations:
    names += [module.name for module in pkgutil.iter_modules(namespace.submodule_search_locations)]
  if importlib.util.find_spec('libtpu') is not None:
    names.append('libtpu')
  return names


# PCI vendor ids of NVIDIA, AMD and Google, and the device classes of a display
# controller (GPUs) or processing accelerator (TPUs): what JAX itself looks for.
_ACCELERATOR_VENDORS = ('0x10de', '0x1002', '0x1ae0')
_ACCELERATOR_CLASSES = ('0x03', '0x12')


def accelerator_hardware(pci_devices: str = '/sys/bus/pci/devices') -> bool:
  """True when a GPU or TPU is on the PCI bus (Linux; False where it cannot tell)."""
  for device in pathlib.Path(pci_devices).glob('*'):
    try:
      vendor = (device / 'vendor').read_text().strip()
      device_class = (device / 'class').read_text().strip()
    except OSError:
      continue
    if vendor in _ACCELERATOR_VENDORS and device_class.startswith(_ACCELERATOR_CLASSES):
      return True
  return False


def _tfds_dir() -> str | None:
  spec = importlib.util.find_spec('tensorflow_datasets')
  return str(pathlib.Path(spec.origin).parent) if spec and spec.origin else None


class TfdsFilter(logging.Filter):
  """Drops TFDS's INFO records and its warnings that are harmless here (see the docstring)."""

  def __init__(self, tfds_dir: str | None):
    super().__init__()
    self._tfds_dir = tfds_dir

  def filter(self, record: logging.LogRecord) -> bool:
    if self._tfds_dir is None or not record.pathname.startswith(self._tfds_dir):
      return True
    if record.levelno <= logging.INFO:
      return False
    message = record.getMessage()
    return not any(text in message for text in _HARMLESS_TFDS_MESSAGES)


def apply() -> None:
  """Sets the defaults above; idempotent."""
  if ('JAX_PLATFORMS' not in os.environ and not accelerator_plugins()
      and not accelerator_hardware()):
    os.environ['JAX_PLATFORMS'] = 'cpu'
  # TFDS logs through absl.logging. (Its logger must be absl's own class, which
  # names the calling file: so absl.logging is imported before asking for it.)
  absl_logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, TfdsFilter) for f in absl_logger.filters):
    absl_logger.addFilter(TfdsFilter(_tfds_dir()))
