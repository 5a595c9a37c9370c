"""Fixtures shared between test files: the prepared Fashion-MNIST."""
import pytest


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
