"""Measures how many examples per second the input pipelines deliver.

The train pipeline should outrun the training step by a wide margin (5x or
more); `scripts/benchmark_input.py` prints both rates for a config. Datasets
that are not prepared can be measured on TFDS mock data of the same shapes:
the in-memory pipelines' speed does not depend on the pixel values.
"""
import contextlib
import dataclasses
import os
import tempfile
import time
from typing import Iterator

import tensorflow_datasets as tfds

from mobilenet.data import input_pipeline


@dataclasses.dataclass(frozen=True)
class Rate:
  """Throughput of one pipeline, after its first batch (startup) is excluded."""
  examples_per_s: float
  startup_s: float  # Time to the first batch: reading/decoding the split.
  num_batches: int
  batch_size: int


def measure(make_iterator, num_batches: int) -> Rate:
  """Times `num_batches` batches after the first one, restarting if exhausted."""
  start = time.perf_counter()
  iterator = make_iterator()
  first = next(iterator)
  startup_s = time.perf_counter() - start
  examples = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator, None)
    if batch is None:  # A finite (eval) pass ended: start another.
      iterator = make_iterator()
      batch = next(iterator)
    examples += len(batch['label'])
  elapsed = time.perf_counter() - start
  return Rate(examples / elapsed, startup_s, num_batches, len(first['label']))


def benchmark(config, num_batches: int) -> dict[str, Rate]:
  """Rates of the train and eval pipelines for `config`."""
  return {
      'train': measure(lambda: input_pipeline.create_train_iterator(config),
                       num_batches),
      'eval': measure(lambda: input_pipeline.create_eval_iterator(config),
                      num_batches),
  }


def write_mock_metadata(name: str, data_dir: str, num_examples: int) -> None:
  """Writes TFDS metadata for `name` with `num_examples` in every split.

  `tfds.testing.mock_data` generates examples but takes split sizes from
  metadata on disk; the pip package ships none, so we write our own.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(
          name=split, shard_lengths=[num_examples], num_bytes=0,
          filename_template=tfds.core.ShardedFileTemplate(
              data_dir=builder.data_dir, dataset_name=name, split=split,
              filetype_suffix='tfrecord'))
      for split in ('train', 'test', 'validation')
  ]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


@contextlib.contextmanager
def mock_dataset(name: str, num_examples: int) -> Iterator[str]:
  """Within: TFDS serves `num_examples` random examples per split of `name`.

  Yields the mock data dir to put in `config.data_dir`; the dataset counts
  as prepared there, so `input_pipeline.ensure_available` passes.
  """
  with tempfile.TemporaryDirectory(prefix='tfds_mock_') as data_dir:
    write_mock_metadata(name, data_dir, num_examples)
    with tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES,
        data_dir=data_dir):
      yield data_dir
