"""Input pipelines: TFDS -> tf.data -> host-local numpy batches.

Two designs, both deterministic for a given `config.seed`:

* Small datasets (fashion_mnist, cifar10, cifar100) are decoded once into
  memory. Training step `k` is a pure function of (seed, k): its examples are
  positions `[j * B, (j + 1) * B)` (j = k mod steps_per_epoch) of a stateless
  permutation of the train split keyed by (seed, epoch)
  (`tf.random.experimental.index_shuffle`), and its crop offsets and flips
  come from stateless random ops keyed by (seed, k). Each host takes its own
  slice of that global batch, so hosts never share an example in an epoch, the
  global batch does not depend on the number of hosts, and starting at any
  step reads nothing before it. The last `num_train % batch_size` positions
  of each epoch's permutation are not used. `config.input.cache` keeps the
  decoded splits for later iterators (eval runs every epoch).
* imagenet2012 streams JPEG records (decoded late, fused with the crop) in a
  per-epoch order fixed by (seed, epoch): file order, shuffle buffer and the
  per-example augmentation seeds. Starting at step k begins at k's epoch and
  skips the records of that epoch's earlier steps without decoding them;
  earlier epochs are never read. Only this pipeline uses
  `config.input.shuffle_buffer`.

Eval pipelines pass over the test split (imagenet2012: validation) exactly
once: every host yields ceil(num_eval / eval_batch_size) batches, padded at
the end with examples whose 'mask' is False.

TensorFlow is imported only here (and in the other data modules), never by the
model code, and it is kept off the GPUs, which belong to JAX.
"""
import concurrent.futures
import dataclasses
import math
import os
import socket
import threading
from typing import Iterator
import urllib.parse

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mobilenet.data import fashion_mnist_offline, preparation_lock
from mobilenet.errors import UserError

try:
  # TF would otherwise reserve GPU memory that JAX needs.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialized its devices; nothing to change.
  pass

# How long to wait for a dataset's download host before declaring it offline.
NETWORK_PROBE_TIMEOUT_S = 3.0

# The two manual-download files TFDS's imagenet2012 builder expects.
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')

# Stream tags so the shuffle and augmentation seeds never coincide.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset, after preprocessing."""
  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  image_shape: tuple[int, int, int]  # (resolution, resolution, channels).


@dataclasses.dataclass(frozen=True)
class _DatasetSpec:
  """Per-dataset constants: eval split and normalization (on [0, 1] pixels)."""
  eval_split: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  in_memory: bool  # Small enough to decode once and index randomly.


_SPECS = {
    'fashion_mnist': _DatasetSpec('test', (0.2860,), (0.3530,), True),
    'cifar10': _DatasetSpec(
        'test', (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    'cifar100': _DatasetSpec(
        'test', (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    # TFDS's imagenet2012 test split has no labels; validation is the test set.
    'imagenet2012': _DatasetSpec(
        'validation', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
}


def _spec(config) -> _DatasetSpec:
  if config.dataset not in _SPECS:
    raise UserError(
        f'Unknown config.dataset {config.dataset!r}: use one of '
        f'{", ".join(_SPECS)}.')
  return _SPECS[config.dataset]


def _builder(config) -> tfds.core.DatasetBuilder:
  return tfds.builder(config.dataset, data_dir=config.data_dir)


def _host_batch_size(global_batch_size: int, name: str) -> int:
  """Splits a global batch size evenly over the hosts."""
  count = jax.process_count()
  if global_batch_size % count:
    raise UserError(
        f'config.{name}={global_batch_size} is not divisible by the '
        f'{count} hosts: make it a multiple of {count}.')
  return global_batch_size // count


def _missing_data_message(builder, reason: str) -> str:
  """One line: which dataset is missing where, why, and how to get it."""
  name, data_dir = builder.name, builder.data_dir_root
  if name == 'imagenet2012':
    manual_dir = os.path.join(data_dir, 'downloads', 'manual')
    fix = (f'put {" and ".join(IMAGENET_TARS)} in {manual_dir} and run '
           f'`tfds build imagenet2012 --data_dir {data_dir} '
           f'--manual_dir {manual_dir}`')
  else:
    fix = (f'run `tfds build {name} --data_dir {data_dir}` on a machine with '
           'network access and copy the data there')
  return (f'Dataset {name} is not prepared in data dir {data_dir} ({reason}): '
          f'{fix}, or point config.data_dir (or TFDS_DATA_DIR) at a data dir '
          f'that has {name}.')


def _host_reachable(url: str) -> bool:
  """Whether a TCP connection to the URL's host opens within a few seconds.

  Runs in a daemon thread because the connect timeout does not bound the DNS
  lookup, which can hang for tens of seconds on a machine without network.
  """
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  connected = threading.Event()

  def connect():
    try:
      with socket.create_connection((parsed.hostname, port),
                                    timeout=NETWORK_PROBE_TIMEOUT_S):
        connected.set()
    except OSError:
      pass

  threading.Thread(target=connect, daemon=True).start()
  return connected.wait(NETWORK_PROBE_TIMEOUT_S)


def _check_local_data_dir(data_dir: str | None, writing: bool = False) -> None:
  """A local data dir that is a file, or (to prepare the data) not writable, as one line.

  TFDS would raise NotADirectoryError or EROFS from deep inside; gs:// paths
  and TFDS's default are left to TFDS.
  """
  if not data_dir or '://' in data_dir:
    return
  path = os.path.abspath(os.path.expanduser(data_dir))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f'config.data_dir={data_dir!r}: {existing} is a file, not a folder; pass '
                    '--config.data_dir=<a folder>')
  if writing and not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'config.data_dir={data_dir!r} does not hold the dataset and {existing} is '
                    'not writable (a read-only file system or folder), so it cannot be prepared '
                    'there; pass --config.data_dir=<a writable folder> or prepare it elsewhere')


def ensure_available(config) -> None:
  """Makes sure the dataset is prepared in the data dir, or fails fast.

  Order: already prepared -> nothing to do; fashion_mnist with the Debian
  package's files -> prepare offline from them; imagenet2012 -> prepare from
  the manual-download tars if present; otherwise download with TFDS if the
  download host answers within a few seconds. Anything else raises a one-line
  `UserError` (TFDS's own downloader would retry for minutes offline).
  """
  _spec(config)
  _check_local_data_dir(config.data_dir)
  builder = _builder(config)
  if builder.is_prepared():
    return
  _check_local_data_dir(config.data_dir, writing=True)
  # Runs started together would race to prepare it: one at a time, and the
  # ones that waited find it prepared.
  with preparation_lock.exclusive(builder.data_dir_root, config.dataset):
    _prepare(config)


def _prepare(config) -> None:
  """ensure_available's work once it holds the preparation lock."""
  builder = _builder(config)
  if builder.is_prepared():
    logging.info('%s was prepared in %s by another process', config.dataset,
                 builder.data_dir_root)
    return
  if (config.dataset == 'fashion_mnist'
      and fashion_mnist_offline.debian_files_available()):
    fashion_mnist_offline.prepare(config.data_dir)
    return
  if config.dataset == 'imagenet2012':
    manual_dir = os.path.join(builder.data_dir_root, 'downloads', 'manual')
    missing = [f for f in IMAGENET_TARS
               if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
    if missing:
      raise UserError(_missing_data_message(
          builder, f'{", ".join(missing)} missing from {manual_dir}'))
    logging.info('Preparing imagenet2012 from %s (takes hours)...', manual_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return
  url = next(iter(builder.url_infos))
  if not _host_reachable(url):
    raise UserError(_missing_data_message(
        builder, f'cannot reach {urllib.parse.urlparse(url).hostname} to '
        'download it'))
  logging.info('Downloading and preparing %s in %s...', config.dataset,
               builder.data_dir_root)
  builder.download_and_prepare()


def _num_examples(builder, split: str) -> int:
  if split not in builder.info.splits:
    raise UserError(_missing_data_message(builder, f'no {split!r} split there'))
  return builder.info.splits[split].num_examples


def get_dataset_info(config) -> DatasetInfo:
  """Returns the dataset's sizes and the preprocessed image shape (metadata only)."""
  spec = _spec(config)
  builder = _builder(config)
  return DatasetInfo(
      name=config.dataset,
      num_classes=builder.info.features['label'].num_classes,
      num_train_examples=_num_examples(builder, 'train'),
      num_eval_examples=_num_examples(builder, spec.eval_split),
      image_shape=_image_shape(config),
  )


def _image_shape(config) -> tuple[int, int, int]:
  """The preprocessed image: every split is resized and converted to it (_normalize)."""
  return (config.model.resolution, config.model.resolution, config.input.channels)


def steps_per_epoch(config) -> int:
  """Full global batches per pass over the train split (the remainder is dropped)."""
  num_train = get_dataset_info(config).num_train_examples
  if config.batch_size > num_train:
    raise UserError(
        f'config.batch_size={config.batch_size} exceeds the {num_train} '
        f'train examples of {config.dataset}: use a smaller batch size.')
  return num_train // config.batch_size


def _seed(seed: int, *data) -> tf.Tensor:
  """A stateless RNG seed of shape [2], distinct for each (seed, *data)."""
  key = tf.constant([seed, 0], tf.int64)
  for value in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
  return key


def _normalize(images: tf.Tensor, config, spec: _DatasetSpec) -> tf.Tensor:
  """uint8 or [0, 255] float [b, h, w, c] -> normalized float32 [b, R, R, C].

  Resizes to config.model.resolution (bilinear) and converts channels:
  grayscale is repeated to 3 channels; RGB becomes luminance for 1 channel,
  normalized with the luminance-weighted mean and std (an approximation).
  config.input.normalization 'minus_one_to_one' uses mean = std = 0.5 instead
  of the dataset's statistics: x / 127.5 - 1.
  """
  images = tf.cast(images, tf.float32)
  resolution = config.model.resolution
  if images.shape[1:3] != (resolution, resolution):
    # Antialiasing matters only when shrinking and costs 10x when enlarging.
    images = tf.image.resize(images, (resolution, resolution),
                             antialias=resolution < images.shape[1])
  mean = np.array(spec.mean, np.float32)
  std = np.array(spec.std, np.float32)
  if config.input.normalization == 'minus_one_to_one':  # x / 127.5 - 1 (Keras' MobileNets).
    mean = std = np.full_like(mean, 0.5)
  native, wanted = images.shape[-1], config.input.channels
  if native == 1 and wanted == 3:
    images = tf.repeat(images, 3, axis=-1)
  elif native == 3 and wanted == 1:
    luminance = np.array([0.2989, 0.5870, 0.1140], np.float32)
    images = tf.image.rgb_to_grayscale(images)
    mean, std = mean @ luminance, std @ luminance
  elif native != wanted:
    raise UserError(
        f'config.input.channels={wanted} is not supported for '
        f'{config.dataset} ({native} channels): use 1 or 3.')
  # (x / 255 - mean) / std as one multiply-add, with the per-channel constants
  # spelled out to the image shape: broadcasting a [C] vector is 2x slower.
  shape = images.shape[1:]
  scale = np.broadcast_to(1 / (255 * std), shape).astype(np.float32)
  offset = np.broadcast_to(-mean / std, shape).astype(np.float32)
  return images * scale + offset


def _pad_crop_flip(images: tf.Tensor, draws: tf.Tensor, padding: int,
                   flip: bool) -> tf.Tensor:
  """CIFAR-style augmentation of a batch, each example with its own draw.

  Zero-pads by `padding`, crops back to the original size at offsets
  `draws[:, 0:2] mod (2 * padding + 1)` and mirrors where `draws[:, 2]` is odd
  (if `flip`). One `crop_and_resize` (nearest, at integer positions: an exact
  copy; a box with x1 > x2 mirrors) is 2x faster than per-axis gathers.
  Returns float32 pixels.
  """
  _, height, width, _ = images.shape
  images = tf.pad(images, [[0, 0], [padding, padding], [padding, padding],
                           [0, 0]])
  offsets = tf.cast(draws[:, :2] % (2 * padding + 1), tf.float32)
  # Normalized box corners: padded pixel p sits at p / (padded size - 1).
  top = offsets[:, 0] / (height + 2 * padding - 1)
  bottom = (offsets[:, 0] + height - 1) / (height + 2 * padding - 1)
  left = offsets[:, 1] / (width + 2 * padding - 1)
  right = (offsets[:, 1] + width - 1) / (width + 2 * padding - 1)
  if flip:
    mirror = draws[:, 2] % 2 == 1
    left, right = tf.where(mirror, right, left), tf.where(mirror, left, right)
  boxes = tf.stack([top, left, bottom, right], axis=1)
  return tf.image.crop_and_resize(
      images, boxes, tf.range(tf.shape(images)[0]), (height, width),
      method='nearest')


def _decode_split(config, split: str) -> tuple[tf.Tensor, tf.Tensor]:
  """Decodes a whole split into memory: (uint8 images [n, h, w, c], labels [n])."""
  builder = _builder(config)
  num_examples = _num_examples(builder, split)
  logging.info('Decoding %d %s examples of %s into memory...', num_examples,
               split, config.dataset)
  data = builder.as_dataset(split=split, batch_size=-1)  # One dict of tensors.
  return data['image'], tf.cast(data['label'], tf.int32)


# Decoded splits kept by config.input.cache, keyed by (dataset, data_dir,
# split): decoding takes seconds (about 6,000 PNGs/s on 2 cores) and eval
# runs every epoch.
_decoded_splits: dict[tuple[str, str | None, str],
                      tuple[tf.Tensor, tf.Tensor]] = {}


# Splits that decode_in_background started, under the same keys, until an
# iterator takes them.
_decoding: dict[tuple[str, str | None, str], concurrent.futures.Future] = {}
_decoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='decode')


def _split_key(config, split: str) -> tuple[str, str | None, str]:
  return (config.dataset, config.data_dir, split)


def decode_in_background(config) -> None:
  """Starts decoding an in-memory dataset's train and eval splits on a thread.

  The trainer calls it before initializing and compiling, which keep one core
  busy with XLA, so the seconds of decoding overlap them instead of following;
  the iterators then take the splits from the cache. A no-op without
  config.input.cache (nothing would keep the result) and for streamed datasets.
  A decoding error is raised where the split is first used, as without it.
  """
  spec = _spec(config)
  if not (spec.in_memory and config.input.cache):
    return
  for split in ('train', spec.eval_split):
    key = _split_key(config, split)
    if key not in _decoded_splits and key not in _decoding:
      _decoding[key] = _decoder.submit(_decode_split, config, split)


def _load_split(config, split: str) -> tuple[tf.Tensor, tf.Tensor]:
  """The decoded split, from the in-memory cache when config.input.cache."""
  if not config.input.cache:
    return _decode_split(config, split)
  key = _split_key(config, split)
  if key not in _decoded_splits:
    pending = _decoding.pop(key, None)
    _decoded_splits[key] = pending.result() if pending else _decode_split(config, split)
  return _decoded_splits[key]


def clear_cache() -> None:
  """Forgets the decoded splits (e.g. after the data dir's data changed)."""
  for pending in _decoding.values():
    pending.cancel() or pending.exception()  # Waits for one already running.
  _decoding.clear()
  _decoded_splits.clear()


def train_batch_shapes(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) per key of the global train batch that the hosts' batches make up.

  What create_train_iterator yields (per host, its rows), known before any data
  is read: the trainer compiles its step for it while the data decodes.
  """
  return {'image': ((config.batch_size, *_image_shape(config)), np.dtype(np.float32)),
          'label': ((config.batch_size,), np.dtype(np.int32))}


def _in_memory_train(config, spec: _DatasetSpec, start_step: int
                     ) -> tf.data.Dataset:
  """The host's part of global batch k, for k = start_step, start_step + 1, ..."""
  images, labels = _load_split(config, 'train')
  num_examples = int(images.shape[0])
  global_batch = config.batch_size
  host_batch = _host_batch_size(global_batch, 'batch_size')
  host_offset = jax.process_index() * host_batch
  per_epoch = steps_per_epoch(config)
  padding = config.input.random_crop_padding
  flip = config.input.random_flip

  def make_batch(step):
    epoch = step // per_epoch
    positions = ((step % per_epoch) * global_batch + host_offset
                 + tf.range(host_batch, dtype=tf.int64))
    indices = tf.random.experimental.index_shuffle(
        positions, _seed(config.seed, _SHUFFLE_STREAM, epoch),
        tf.constant(num_examples - 1, tf.int64))
    batch = tf.gather(images, indices)
    if padding or flip:
      # Drawn for the whole global batch, of which this host keeps its rows,
      # so a batch's augmentation does not depend on the number of hosts.
      draws = tf.random.stateless_uniform(
          [global_batch, 3], _seed(config.seed, _AUGMENT_STREAM, step),
          minval=0, maxval=2**30, dtype=tf.int32)
      batch = _pad_crop_flip(
          batch, draws[host_offset:host_offset + host_batch], padding, flip)
    return {'image': _normalize(batch, config, spec),
            'label': tf.gather(labels, indices)}

  return tf.data.Dataset.counter(start_step).map(
      make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _eval_layout(num_examples: int, config) -> tuple[int, int]:
  """(batches every host yields, host batch size) for one padded eval pass."""
  host_batch = _host_batch_size(config.eval_batch_size, 'eval_batch_size')
  return math.ceil(num_examples / config.eval_batch_size), host_batch


def _in_memory_eval(config, spec: _DatasetSpec) -> tf.data.Dataset:
  """Global eval batch t covers positions [t * E, (t + 1) * E); hosts slice it."""
  images, labels = _load_split(config, spec.eval_split)
  num_examples = int(images.shape[0])
  num_batches, host_batch = _eval_layout(num_examples, config)
  host_offset = jax.process_index() * host_batch

  def make_batch(batch_index):
    positions = (batch_index * config.eval_batch_size + host_offset
                 + tf.range(host_batch, dtype=tf.int64))
    mask = positions < num_examples
    # Padding repeats the last example, masked out.
    indices = tf.minimum(positions, num_examples - 1)
    return {'image': _normalize(tf.gather(images, indices), config, spec),
            'label': tf.gather(labels, indices),
            'mask': mask}

  return tf.data.Dataset.range(num_batches).map(
      make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _decode_and_random_crop(image_bytes: tf.Tensor, seed: tf.Tensor,
                            min_area: float) -> tf.Tensor:
  """Inception-style random-resized crop, decoding only the cropped JPEG window."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, whole_image, seed=seed, min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(min_area, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  offset_y, offset_x, _ = tf.unstack(begin)
  height, width, _ = tf.unstack(size)
  window = tf.stack([offset_y, offset_x, height, width])
  return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)


def _decode_and_center_crop(image_bytes: tf.Tensor, fraction: float
                            ) -> tf.Tensor:
  """Central square of side `fraction * min(height, width)`, decoded alone."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  height, width = shape[0], shape[1]
  side = tf.cast(
      fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  window = tf.stack([(height - side + 1) // 2, (width - side + 1) // 2,
                     side, side])
  return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)


def _resize_square(image: tf.Tensor, resolution: int) -> tf.Tensor:
  """Resizes one decoded crop to [R, R, 3] float pixels in [0, 255]."""
  image = tf.image.resize(image, (resolution, resolution), method='bicubic',
                          antialias=True)
  return tf.clip_by_value(image, 0.0, 255.0)


def _epoch_seed(config, epoch: int) -> int:
  """A Python-int seed per (seed, epoch), for TFDS file order and tf.data shuffle.

  Distinct for all epochs below 100,003 (a prime), far more than any run has.
  """
  return config.seed * 100_003 + epoch


def _read_records(config, split: str, *, epoch: int | None = None
                  ) -> tf.data.Dataset:
  """ImageNet records of `split` with undecoded images, files ordered by epoch."""
  read_config = tfds.ReadConfig(
      shuffle_seed=None if epoch is None else _epoch_seed(config, epoch))
  return _builder(config).as_dataset(
      split=split, shuffle_files=epoch is not None, read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()})


def _host_split(split: str) -> str:
  """This host's disjoint part of `split` (sizes differ by at most one)."""
  return tfds.even_splits(split, n=jax.process_count())[jax.process_index()]


def _imagenet_train_epoch(config, spec: _DatasetSpec, epoch: int,
                          skip_batches: int) -> tf.data.Dataset:
  """One epoch of this host's batches, starting after `skip_batches` of them.

  The skipped records are read (a stream has no random access) but not
  decoded: augmentation seeds come from each record's position in the epoch.
  """
  host_batch = _host_batch_size(config.batch_size, 'batch_size')
  per_epoch = steps_per_epoch(config)
  host_id = jax.process_index()
  resolution = config.model.resolution
  min_area = config.input.min_crop_area
  flip = config.input.random_flip

  def preprocess(position, example):
    seed = _seed(config.seed, _AUGMENT_STREAM, epoch, host_id, position)
    image = _decode_and_random_crop(example['image'], seed, min_area)
    image = _resize_square(image, resolution)
    if flip:
      image = tf.image.stateless_random_flip_left_right(
          image, tf.random.experimental.stateless_fold_in(seed, 1))
    return image, tf.cast(example['label'], tf.int32)

  ds = _read_records(config, _host_split('train'), epoch=epoch)
  ds = ds.shuffle(config.input.shuffle_buffer, seed=_epoch_seed(config, epoch))
  ds = ds.take(per_epoch * host_batch).enumerate()
  ds = ds.skip(skip_batches * host_batch)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(host_batch, drop_remainder=True)
  return ds.map(
      lambda images, labels: {'image': _normalize(images, config, spec),
                              'label': labels},
      num_parallel_calls=tf.data.AUTOTUNE)


def _imagenet_eval(config, spec: _DatasetSpec) -> tf.data.Dataset:
  """This host's validation part, padded to the common number of batches."""
  builder = _builder(config)
  num_batches, host_batch = _eval_layout(
      _num_examples(builder, spec.eval_split), config)
  resolution = config.model.resolution
  fraction = config.input.eval_crop_fraction

  def preprocess(example):
    image = _decode_and_center_crop(example['image'], fraction)
    return {'image': _resize_square(image, resolution),
            'label': tf.cast(example['label'], tf.int32),
            'mask': True}

  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([resolution, resolution, 3]),
      'label': 0,
      'mask': False,
  }).repeat()
  ds = _read_records(config, _host_split(spec.eval_split))
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(padding).take(num_batches * host_batch)
  ds = ds.batch(host_batch, drop_remainder=True)
  return ds.map(
      lambda batch: {**batch, 'image': _normalize(batch['image'], config, spec)},
      num_parallel_calls=tf.data.AUTOTUNE)


def _finish(ds: tf.data.Dataset, config) -> tf.data.Dataset:
  """Deterministic order despite parallelism, and background prefetching."""
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(config.input.prefetch_batches)


def _imagenet_train_batches(config, spec: _DatasetSpec, start_step: int
                            ) -> Iterator[dict[str, np.ndarray]]:
  """Chains per-epoch ImageNet pipelines, the first one entered mid-epoch."""
  epoch, skip_batches = divmod(start_step, steps_per_epoch(config))
  while True:
    ds = _imagenet_train_epoch(config, spec, epoch, skip_batches)
    yield from _finish(ds, config).as_numpy_iterator()
    epoch, skip_batches = epoch + 1, 0


def create_train_iterator(config, *, start_step: int = 0
                          ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local train batches, starting with global step `start_step`.

  Yields {'image': float32 [b, R, R, C], 'label': int32 [b]} with
  b = config.batch_size // jax.process_count(). Batch k is the same whether
  the iterator started at 0 or at any start_step <= k (same seed).
  """
  spec = _spec(config)
  if spec.in_memory:
    ds = _in_memory_train(config, spec, start_step)
    return _finish(ds, config).as_numpy_iterator()
  _host_batch_size(config.batch_size, 'batch_size')  # Fail now, not on next().
  return _imagenet_train_batches(config, spec, start_step)


def create_eval_iterator(config) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the eval split in host-local batches with a 'mask'.

  Yields {'image', 'label', 'mask': bool [b]} with
  b = config.eval_batch_size // jax.process_count(); every host yields
  ceil(num_eval / eval_batch_size) batches, and over all hosts each eval
  example appears exactly once with mask True.
  """
  spec = _spec(config)
  ds = (_in_memory_eval(config, spec) if spec.in_memory
        else _imagenet_eval(config, spec))
  return _finish(ds, config).as_numpy_iterator()
