"""Real Fashion-MNIST prepared offline from the Debian package's files."""
import gzip
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mobilenet.training import config_base
from mobilenet import errors
from mobilenet.data import fashion_mnist_offline, input_pipeline

pytestmark = pytest.mark.skipif(
    not fashion_mnist_offline.debian_files_available(),
    reason='needs the Debian package dataset-fashion-mnist')


def _config(data_dir):
  config = config_base.base_config()
  config.data_dir = data_dir
  config.eval_batch_size = 384  # Does not divide the 10,000 test examples.
  return config


@pytest.fixture
def data_dir(fashion_mnist_data_dir):
  return fashion_mnist_data_dir


def _debian_array(filename, header_bytes):
  path = os.path.join(fashion_mnist_offline.DEBIAN_DIR, filename)
  with gzip.open(path, 'rb') as f:
    return np.frombuffer(f.read()[header_bytes:], np.uint8)


def _split(data_dir, split):
  """The prepared split as numpy: images [n, 28, 28, 1], labels [n]."""
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  data = builder.as_dataset(split=split, batch_size=-1)
  return data['image'].numpy(), data['label'].numpy()


def _stored_labels(builder, split):
  """The labels in a split's record files, parsed in one batch.

  10x faster than TFDS's per-example reading, which this test does not need.
  """
  files = [os.path.join(builder.data_dir, filename)
           for filename in builder.info.splits[split].filenames]
  records = tf.data.TFRecordDataset(files).batch(100_000).get_single_element()
  features = {'label': tf.io.FixedLenFeature([], tf.int64)}
  return tf.io.parse_example(records, features)['label'].numpy()


@pytest.mark.slow
def test_is_a_real_tfds_dataset_with_the_original_labels(data_dir):
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 60_000
  assert builder.info.splits['test'].num_examples == 10_000
  assert builder.info.features['label'].names[0] == 'T-shirt/top'
  for split, prefix, per_class in (('train', 'train', 6_000),
                                   ('test', 't10k', 1_000)):
    labels = _stored_labels(builder, split)
    assert np.bincount(labels).tolist() == [per_class] * 10
    # TFDS stores examples in an order shuffled by key, as for a download.
    debian = _debian_array(f'{prefix}-labels-idx1-ubyte.gz', 8)
    np.testing.assert_array_equal(np.sort(labels), np.sort(debian))


@pytest.mark.slow
def test_test_split_holds_the_debian_examples(data_dir):
  images, labels = _split(data_dir, 'test')
  debian_images = _debian_array('t10k-images-idx3-ubyte.gz', 16)
  debian_labels = _debian_array('t10k-labels-idx1-ubyte.gz', 8)
  prepared = sorted(zip(map(bytes, images.reshape(10_000, -1)), labels))
  expected = sorted(zip(map(bytes, debian_images.reshape(10_000, -1)),
                        debian_labels))
  assert prepared == expected


@pytest.mark.slow
def test_second_prepare_is_a_quick_no_op(data_dir):
  start = time.perf_counter()
  assert not fashion_mnist_offline.prepare(data_dir)
  input_pipeline.ensure_available(_config(data_dir))
  assert time.perf_counter() - start < 2


@pytest.mark.slow
def test_eval_pipeline_sees_each_test_example_once(data_dir):
  config = _config(data_dir)
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (60_000, 10_000)
  batches = list(input_pipeline.create_eval_iterator(config))
  assert len(batches) == 27  # ceil(10,000 / 384).
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, _split(data_dir, 'test')[1])
  assert batches[0]['image'].shape == (384, 28, 28, 1)
  config.input.channels = 3
  config.model.resolution = 32
  image = next(input_pipeline.create_eval_iterator(config))['image']
  assert image.shape == (384, 32, 32, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # Gray as RGB.


def test_missing_source_files_raise_a_user_error(tmp_path):
  with pytest.raises(errors.UserError, match='dataset-fashion-mnist'):
    fashion_mnist_offline.prepare(str(tmp_path), source_dir=str(tmp_path))
