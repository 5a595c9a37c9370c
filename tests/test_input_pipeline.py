"""Input pipelines on TFDS mock data: shapes, host sharding, eval coverage,
determinism, start-at-step, and failing fast on missing data."""
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mobilenet.training import config_base
from mobilenet import errors
from mobilenet.bench import input_benchmark
from mobilenet.data import input_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_EXAMPLES = 300  # Per split; divides neither the batch nor the eval batch.


def _config(dataset, data_dir, **input_fields):
  config = config_base.base_config()
  config.dataset = dataset
  config.data_dir = data_dir
  config.batch_size = 32
  config.eval_batch_size = 64
  config.model.resolution = 32
  config.input.channels = 3
  config.input.update(input_fields)
  return config


@pytest.fixture
def mock(request):
  """Mock data for the dataset named by the test's parameter; yields data_dir."""
  name, num_examples = request.param
  input_pipeline.clear_cache()
  with input_benchmark.mock_dataset(name, num_examples) as data_dir:
    yield data_dir
  input_pipeline.clear_cache()


def _hosts(monkeypatch, index, count):
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _keys(images):
  """Hashable identities of (unaugmented) example images."""
  return [image.tobytes() for image in images]


@pytest.mark.parametrize(
    'mock, dataset, channels, num_classes',
    [(('cifar10', 40), 'cifar10', 3, 10),
     (('cifar100', 40), 'cifar100', 1, 100),
     (('imagenet2012', 40), 'imagenet2012', 3, 1000)],
    indirect=['mock'])
def test_batches_have_the_promised_shapes_and_ranges(mock, dataset, channels,
                                                     num_classes):
  config = _config(dataset, mock, channels=channels, random_crop_padding=4,
                   random_flip=True)
  input_pipeline.ensure_available(config)  # Mock metadata counts as prepared.
  info = input_pipeline.get_dataset_info(config)
  assert info == input_pipeline.DatasetInfo(
      config.dataset, num_classes, 40, 40, (32, 32, channels))
  assert input_pipeline.steps_per_epoch(config) == 1

  batch = next(input_pipeline.create_train_iterator(config))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (32, 32, 32, channels)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert 0 <= batch['label'].min() and batch['label'].max() < num_classes
  # Pixels in [0, 255] normalized with ImageNet/CIFAR statistics.
  assert -2.5 < batch['image'].min() < -1 and 1 < batch['image'].max() < 3
  # What the trainer compiles its step for before any data is read.
  assert input_pipeline.train_batch_shapes(config) == {
      key: (value.shape, value.dtype) for key, value in batch.items()}
  assert abs(batch['image'].mean()) < 1

  eval_batches = list(input_pipeline.create_eval_iterator(config))
  assert len(eval_batches) == 1
  (batch,) = eval_batches
  assert batch['image'].shape == (64, 32, 32, channels)
  assert batch['mask'].dtype == bool and batch['mask'].sum() == 40
  assert np.isfinite(batch['image']).all()


@pytest.mark.parametrize('mock', [('cifar10', NUM_EXAMPLES)], indirect=True)
def test_hosts_split_each_global_batch_disjointly(mock, monkeypatch):
  config = _config('cifar10', mock)
  steps = input_pipeline.steps_per_epoch(config)  # 9: 288 of 300 examples.
  single = _take(input_pipeline.create_train_iterator(config), steps + 1)
  per_host = []
  for index in range(2):
    _hosts(monkeypatch, index, 2)
    per_host.append(_take(input_pipeline.create_train_iterator(config),
                          steps + 1))
  for step in range(steps + 1):
    halves = [per_host[index][step] for index in range(2)]
    assert halves[0]['image'].shape[0] == 16
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([h[key] for h in halves]), single[step][key])
  epoch = np.concatenate([b['image'] for b in single[:steps]])
  assert len(set(_keys(epoch))) == steps * config.batch_size  # No repeats.
  next_epoch = np.concatenate([b['image'] for b in single[steps:]])
  assert not np.array_equal(next_epoch[:32], epoch[:32])  # Reshuffled.


@pytest.mark.parametrize('mock', [('cifar10', NUM_EXAMPLES)], indirect=True)
@pytest.mark.parametrize('num_hosts', [1, 2, 4])
def test_eval_covers_every_example_exactly_once(mock, monkeypatch, num_hosts):
  config = _config('cifar10', mock)
  expected = _keys(input_pipeline._decode_split(config, 'test')[0].numpy())
  seen, batch_counts = [], []
  for index in range(num_hosts):
    _hosts(monkeypatch, index, num_hosts)
    batches = list(input_pipeline.create_eval_iterator(config))
    batch_counts.append(len(batches))
    for batch in batches:
      assert batch['image'].shape[0] == 64 // num_hosts
      images = batch['image'][batch['mask']]
      # Undo the normalization to compare with the decoded uint8 images.
      spec = input_pipeline._SPECS['cifar10']
      pixels = np.round((images * spec.std + spec.mean) * 255).astype(np.uint8)
      seen.extend(_keys(pixels))
  assert batch_counts == [5] * num_hosts  # ceil(300 / 64), on every host.
  assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize('mock', [('cifar10', NUM_EXAMPLES)], indirect=True)
def test_same_seed_same_batches_and_start_step_resumes_exactly(mock):
  config = _config('cifar10', mock, random_crop_padding=4, random_flip=True)
  first = _take(input_pipeline.create_train_iterator(config), 12)
  again = _take(input_pipeline.create_train_iterator(config), 12)
  resumed = _take(input_pipeline.create_train_iterator(config, start_step=7), 5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  for a, b in zip(first[7:], resumed):  # Crosses the epoch end at step 9.
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  config.seed = 1
  other = next(input_pipeline.create_train_iterator(config))
  assert not np.array_equal(other['image'], first[0]['image'])


@pytest.mark.parametrize('mock', [('cifar10', NUM_EXAMPLES)], indirect=True)
def test_start_step_far_ahead_does_not_replay(mock):
  config = _config('cifar10', mock)
  next(input_pipeline.create_train_iterator(config))  # Decode and cache.
  start = time.perf_counter()
  next(input_pipeline.create_train_iterator(config, start_step=10**9))
  assert time.perf_counter() - start < 5


@pytest.mark.parametrize('mock', [('imagenet2012', 37)], indirect=True)
def test_imagenet_resumes_mid_epoch_and_pads_eval(mock):
  config = _config('imagenet2012', mock, random_flip=True)
  config.batch_size = 8
  config.eval_batch_size = 10
  assert input_pipeline.steps_per_epoch(config) == 4
  first = _take(input_pipeline.create_train_iterator(config), 7)
  resumed = _take(input_pipeline.create_train_iterator(config, start_step=5), 2)
  for a, b in zip(first[5:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  batches = list(input_pipeline.create_eval_iterator(config))
  assert [b['mask'].sum() for b in batches] == [10, 10, 10, 7]


@pytest.mark.parametrize('mock', [('cifar10', 300)], indirect=True)
def test_background_decoding_gives_the_same_batches_and_its_errors(mock, monkeypatch):
  config = _config('cifar10', mock)
  expected = _take(input_pipeline.create_train_iterator(config, start_step=3), 2)
  expected_eval = next(input_pipeline.create_eval_iterator(config))
  input_pipeline.clear_cache()
  input_pipeline.decode_in_background(config)
  assert len(input_pipeline._decoding) == 2  # pylint: disable=protected-access
  for got, want in zip(_take(input_pipeline.create_train_iterator(config, start_step=3), 2),
                       expected):
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])
  np.testing.assert_array_equal(next(input_pipeline.create_eval_iterator(config))['image'],
                                expected_eval['image'])
  assert not input_pipeline._decoding  # pylint: disable=protected-access

  # A failure on the thread surfaces where the split is used, as without it.
  input_pipeline.clear_cache()

  def damaged(*_):
    raise errors.UserError('the dataset is damaged')

  monkeypatch.setattr(input_pipeline, '_decode_split', damaged)
  input_pipeline.decode_in_background(config)
  with pytest.raises(errors.UserError, match='damaged'):
    next(input_pipeline.create_train_iterator(config))

  # Nothing to keep the result in, or a streamed dataset: nothing starts.
  input_pipeline.clear_cache()
  config.input.cache = False
  input_pipeline.decode_in_background(config)
  assert not input_pipeline._decoding  # pylint: disable=protected-access


def test_pad_crop_flip_is_an_exact_shift_and_mirror():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 8, 6, 3), dtype=np.uint8)
  draws = rng.integers(0, 2**30, (16, 3), dtype=np.int32)
  out = input_pipeline._pad_crop_flip(images, draws, 2, True).numpy()
  padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)])
  for image, (dy, dx, mirror), result in zip(padded, draws, out):
    expected = image[dy % 5:dy % 5 + 8, dx % 5:dx % 5 + 6]
    np.testing.assert_array_equal(
        result, expected[:, ::-1] if mirror % 2 else expected)


def _offline(monkeypatch):
  """Makes the download-host probe answer 'unreachable', as without network."""
  probe = input_pipeline._host_reachable
  monkeypatch.setattr(input_pipeline, '_host_reachable',
                      lambda url: probe(url) and False)


def test_missing_cifar10_fails_fast_naming_dataset_and_data_dir(
    tmp_path, monkeypatch):
  _offline(monkeypatch)
  config = _config('cifar10', str(tmp_path))
  start = time.perf_counter()
  with pytest.raises(errors.UserError) as error:
    input_pipeline.ensure_available(config)
  assert time.perf_counter() - start < 10
  message = str(error.value)
  assert 'cifar10' in message and str(tmp_path) in message
  assert 'tfds build cifar10' in message and 'TFDS_DATA_DIR' in message
  assert '\n' not in message
  with pytest.raises(errors.UserError, match='cifar10'):
    input_pipeline.get_dataset_info(config)


def test_missing_imagenet_names_the_manual_dir(tmp_path):
  config = _config('imagenet2012', str(tmp_path))
  with pytest.raises(errors.UserError) as error:
    input_pipeline.ensure_available(config)
  message = str(error.value)
  assert 'ILSVRC2012_img_train.tar' in message
  assert str(tmp_path / 'downloads' / 'manual') in message


@pytest.mark.slow
def test_benchmark_cli_exits_2_within_30_s_when_cifar10_is_missing(tmp_path):
  url = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
  if input_pipeline._host_reachable(url):
    pytest.skip('network available: the command would download cifar10')
  start = time.perf_counter()
  result = subprocess.run(
      [sys.executable, 'scripts/benchmark_input.py',
       '--config', 'configs/cifar10.py', f'--config.data_dir={tmp_path}',
       '--nomock_if_missing'],
      capture_output=True, text=True, timeout=60,
      cwd=ROOT)
  elapsed = time.perf_counter() - start
  assert result.returncode == errors.EXIT_CODE, result.stderr[-2000:]
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: Dataset cifar10 is not prepared')
  assert elapsed < 30
