"""Fixtures shared between test files: the prepared Fashion-MNIST; the compilation cache."""
import pytest

from mobilenet import compilation_cache

# As the CLIs (and the scripts the tests start) do: a second run of the suite, and the slow tier after
# the default one, load the programs compiled before instead of compiling them again.
compilation_cache.enable()


@pytest.fixture(scope='session')
def fashion_mnist_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir with the real Fashion-MNIST, prepared once per session (20-30 s)."""
  from mobilenet.training import config_base
  from mobilenet.data import input_pipeline
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = config_base.base_config()
  config.data_dir = data_dir
  input_pipeline.ensure_available(config)
  return data_dir
