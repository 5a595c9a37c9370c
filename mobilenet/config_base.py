"""The fields every config shares, with their defaults.

Each file in `configs/` starts from `base_config()` and changes what its
experiment needs, so sweeps, tools and the trainer can rely on one schema.
Every number a researcher may change lives here; `validate` rejects bad
values with a one-line `UserError` before any work starts.
"""
import ml_collections

DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012')
FORMS = ('imagenet', 'cifar')
CONV_TYPES = ('separable', 'standard')
ACTIVATIONS = ('relu', 'relu6')
DTYPES = ('float32', 'bfloat16')
OPTIMIZERS = ('sgd', 'rmsprop', 'adamw')
SCHEDULES = ('constant', 'cosine', 'exponential')


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
  config.model.form = 'cifar'  # 'imagenet': stem stride 2 (224 input); 'cifar': stem stride 1.
  config.model.width_multiplier = 1.0  # alpha in the paper.
  config.model.resolution = 28  # Input side; rho = resolution / 224 in the imagenet form.
  config.model.num_classes = 10
  config.model.conv_type = 'separable'  # 'standard': the paper's "Conv MobileNet" (Table 4).
  config.model.activation = 'relu'  # The paper; released TF checkpoints use 'relu6'.
  config.model.dropout_rate = 0.0
  config.model.dtype = 'float32'  # Compute dtype; parameters stay float32.
  config.model.depthwise_implementation = 'auto'  # 'auto': fastest measured on the backend.
  config.model.min_channels = 8  # Channels are max(int(c * alpha), min_channels).
  config.model.batch_norm_momentum = 0.9
  config.model.batch_norm_epsilon = 1e-3

  config.input = ml_collections.ConfigDict()
  config.input.channels = 1  # Grayscale data is repeated to 3 channels when this is 3.
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
  config.ema_decay = 0.0  # 0: no exponential moving average of the weights.
  return config
