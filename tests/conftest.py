"""Makes the repository root importable; shares the prepared Fashion-MNIST between tests."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def fashion_mnist_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir with the real Fashion-MNIST, prepared once per session (20-30 s)."""
  from mobilenet import config_base, input_pipeline
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = config_base.base_config()
  config.data_dir = data_dir
  input_pipeline.ensure_available(config)
  return data_dir
