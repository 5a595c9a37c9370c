"""MobileNetV1's layer table (Howard et al. 2017, Table 1), as data.

Both the Flax model (model.py) and the analytic counting (counting.py) read
the network from here, so the counted network is the trained network. The
counts are still cross-checked in tests against the initialized parameters
and XLA's own cost analysis, which do not read this table.
"""
import dataclasses
import math

STEM_CHANNELS = 32
# Output channels and depthwise stride of the 13 depthwise-separable blocks.
# Table 1 prints "s2" for the 13th depthwise layer, but its input is already
# 7x7 at 224 and its output stays 7x7: a misprint. TF-slim and Keras use 1.
BLOCK_CHANNELS = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
BLOCK_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
# The 'imagenet' form halves 224 in the stem; the 'cifar' form keeps 32x32
# (or 28x28) inputs at full size there, so the last blocks still see 2x2.
STEM_STRIDES = {'imagenet': 2, 'cifar': 1}
KERNEL_SIZE = 3


def scaled_channels(channels: int, width_multiplier: float, min_channels: int = 8) -> int:
  """Channels after the width multiplier, as TF-slim computes them."""
  return max(int(channels * width_multiplier), min_channels)


def same_output_size(size: int, stride: int) -> int:
  """Output side of a 'SAME'-padded layer (TensorFlow's rule)."""
  return math.ceil(size / stride)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer that holds weights: a convolution or the classifier."""
  name: str  # Parameter path in the Flax model, e.g. 'block_03/depthwise'.
  kind: str  # 'standard', 'depthwise', 'pointwise' or 'dense'.
  kernel_size: int
  stride: int
  in_channels: int
  out_channels: int
  in_size: int  # Input side (square feature maps); 1 for the classifier.
  out_size: int

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the Flax kernel: HWIO for convolutions, (in, out) for dense."""
    if self.kind == 'dense':
      return (self.in_channels, self.out_channels)
    in_per_group = 1 if self.kind == 'depthwise' else self.in_channels
    return (self.kernel_size, self.kernel_size, in_per_group, self.out_channels)

  @property
  def weights(self) -> int:
    """Kernel entries: D_K * D_K * M * N standard, D_K * D_K * M depthwise, M * N pointwise."""
    return math.prod(self.kernel_shape)

  @property
  def biases(self) -> int:
    return self.out_channels if self.kind == 'dense' else 0

  @property
  def batch_norm_channels(self) -> int:
    """Channels of the BatchNorm after this layer (the classifier has none)."""
    return 0 if self.kind == 'dense' else self.out_channels

  @property
  def params(self) -> int:
    """Trainable parameters: weights, biases and the BatchNorm scale and offset."""
    return self.weights + self.biases + 2 * self.batch_norm_channels

  @property
  def mult_adds(self) -> int:
    """Multiply-adds of one forward pass on one example: weights * D_F * D_F."""
    return self.weights * self.out_size * self.out_size


def layer_specs(*, width_multiplier: float = 1.0, resolution: int = 224, form: str = 'imagenet',
                conv_type: str = 'separable', num_classes: int = 1000,
                min_channels: int = 8, input_channels: int = 3) -> list[LayerSpec]:
  """Every weight-holding layer of a MobileNetV1 variant, in order."""
  if form not in STEM_STRIDES:
    raise ValueError(f'unknown form {form!r}; choose one of {tuple(STEM_STRIDES)}')
  if conv_type not in ('separable', 'standard'):
    raise ValueError(f"unknown conv_type {conv_type!r}; choose 'separable' or 'standard'")
  channels = scaled_channels(STEM_CHANNELS, width_multiplier, min_channels)
  stride = STEM_STRIDES[form]
  size = same_output_size(resolution, stride)
  specs = [LayerSpec('stem/conv', 'standard', KERNEL_SIZE, stride, input_channels, channels,
                     resolution, size)]
  for index, (block_channels, stride) in enumerate(zip(BLOCK_CHANNELS, BLOCK_STRIDES), start=1):
    out_channels = scaled_channels(block_channels, width_multiplier, min_channels)
    out_size = same_output_size(size, stride)
    name = block_name(index)
    if conv_type == 'separable':
      specs.append(LayerSpec(f'{name}/depthwise', 'depthwise', KERNEL_SIZE, stride, channels,
                             channels, size, out_size))
      specs.append(LayerSpec(f'{name}/pointwise', 'pointwise', 1, 1, channels, out_channels,
                             out_size, out_size))
    else:
      specs.append(LayerSpec(f'{name}/conv', 'standard', KERNEL_SIZE, stride, channels,
                             out_channels, size, out_size))
    channels, size = out_channels, out_size
  specs.append(LayerSpec('head', 'dense', 1, 1, channels, num_classes, 1, 1))
  return specs


def block_name(index: int) -> str:
  """Parameter-tree name of the index-th (1-based) block."""
  return f'block_{index:02d}'
