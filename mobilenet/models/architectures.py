"""The MobileNet family as data: one table per architecture, resolved into a plan per variant.

A table lists the blocks as the papers print them (channels before the width
multiplier, stride, kernel, expansion, squeeze-and-excitation, activation).
`plan()` turns a table, a width multiplier and a form into concrete layers
(every channel count rounded as the reference implementation rounds it);
the Flax builder (models/mobilenet.py) and the counting (models/counting.py)
both read that plan, so the counted network is the trained network.

- MobileNetV1 (Howard et al. 2017, arXiv 1704.04861, Table 1): 13
  depthwise-separable blocks. Channels max(int(c * alpha), 8), as TF-slim.
  Table 1 prints "s2" for the 13th depthwise layer, but its input is already
  7x7 at 224 and its output stays 7x7: a misprint; TF-slim and Keras use 1.
- MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381, Table 2): inverted
  residual blocks with linear bottlenecks. Rounding as keras.applications:
  outputs make_divisible(int(c * alpha), 8), expansions t * input channels,
  the last 1x1 convolution 1280 unless alpha > 1.
- MobileNetV3 (Howard et al. 2019, arXiv 1905.02244, Tables 1 and 2): Large
  and Small, with squeeze-and-excitation and hard-swish; the minimalistic
  variants (3x3 kernels, ReLU, no SE) of the TF-slim / Keras release.
  Rounding as keras.applications: make_divisible(c * alpha, 8) for outputs
  and expansions (the tables' expansion sizes are given as ratios of the
  input channels), the stem's 16 channels and the 1024/1280 pre-logits layer
  unscaled unless alpha > 1.
"""
import dataclasses
import math

# A block whose activation is the model's configured one (MobileNetV1: ReLU or ReLU6).
CONFIGURED = 'configured'
ACTIVATIONS = ('relu', 'relu6', 'hard_swish')
# The 'imagenet' form halves the input in the stem; the 'cifar' form keeps 32x32
# (or 28x28) inputs at full size there, so the last blocks still see 2x2.
STEM_STRIDES = {'imagenet': 2, 'cifar': 1}


def make_divisible(value: float, divisor: int = 8) -> int:
  """Nearest multiple of `divisor`, at least `divisor`, never 10% below `value` (TF-slim/Keras)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def same_output_size(size: int, stride: int) -> int:
  """Output side of a 'SAME'-padded layer (TensorFlow's rule)."""
  return math.ceil(size / stride)


@dataclasses.dataclass(frozen=True)
class Block:
  """One row of a table: a block before the width multiplier."""
  channels: int
  stride: int = 1
  kernel_size: int = 3
  # 0: a depthwise-separable block (V1). Otherwise an inverted residual block
  # (V2/V3) whose depthwise layer has `expansion` x the input channels.
  expansion: float = 0
  squeeze_excite: bool = False
  activation: str = CONFIGURED


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A table and the rules that turn it into channel counts."""
  name: str
  stem_channels: int
  stem_activation: str
  blocks: tuple[Block, ...]
  # 'tf_slim_v1', 'keras_v2' or 'keras_v3': how the width multiplier rounds (see module doc).
  channel_rule: str
  scale_stem: bool = True
  last_conv_channels: int = 0  # V2: a 1x1 convolution to this many channels after the blocks.
  last_conv_expansion: float = 0  # V3: ... to this many times the last block's channels.
  pre_logits_channels: int = 0  # V3: a dense layer with bias between pooling and classifier.
  head_activation: str = ''  # The activation of the last convolution and the pre-logits.
  se_ratio: float = 0.25  # Squeeze-and-excitation bottleneck / expanded channels.
  default_dropout: float = 0.0


def _v1() -> Architecture:
  channels = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
  strides = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
  return Architecture(
      name='mobilenet_v1', stem_channels=32, stem_activation=CONFIGURED,
      blocks=tuple(Block(c, s) for c, s in zip(channels, strides)), channel_rule='tf_slim_v1')


def _v2() -> Architecture:
  # Table 2: expansion t, output channels c, repeats n, first stride s.
  rows = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))
  blocks = tuple(Block(c, s if repeat == 0 else 1, 3, t, activation='relu6')
                 for t, c, n, s in rows for repeat in range(n))
  return Architecture(
      name='mobilenet_v2', stem_channels=32, stem_activation='relu6', blocks=blocks,
      channel_rule='keras_v2', last_conv_channels=1280, head_activation='relu6')


# MobileNetV3 tables (paper Tables 1 and 2): kernel, expansion size, output
# channels, SE, activation ('RE' ReLU, 'HS' hard-swish), stride. Expansion
# sizes are the paper's at alpha 1; the block keeps them as ratios of its
# input channels, as the reference implementation does.
_V3_LARGE = (
    (3, 16, 16, False, 'RE', 1), (3, 64, 24, False, 'RE', 2), (3, 72, 24, False, 'RE', 1),
    (5, 72, 40, True, 'RE', 2), (5, 120, 40, True, 'RE', 1), (5, 120, 40, True, 'RE', 1),
    (3, 240, 80, False, 'HS', 2), (3, 200, 80, False, 'HS', 1), (3, 184, 80, False, 'HS', 1),
    (3, 184, 80, False, 'HS', 1), (3, 480, 112, True, 'HS', 1), (3, 672, 112, True, 'HS', 1),
    (5, 672, 160, True, 'HS', 2), (5, 960, 160, True, 'HS', 1), (5, 960, 160, True, 'HS', 1))
_V3_SMALL = (
    (3, 16, 16, True, 'RE', 2), (3, 72, 24, False, 'RE', 2), (3, 88, 24, False, 'RE', 1),
    (5, 96, 40, True, 'HS', 2), (5, 240, 40, True, 'HS', 1), (5, 240, 40, True, 'HS', 1),
    (5, 120, 48, True, 'HS', 1), (5, 144, 48, True, 'HS', 1), (5, 288, 96, True, 'HS', 2),
    (5, 576, 96, True, 'HS', 1), (5, 576, 96, True, 'HS', 1))


def _v3(name: str, rows, pre_logits: int, minimalistic: bool) -> Architecture:
  blocks, in_channels = [], 16
  for kernel, expanded, out, squeeze_excite, activation, stride in rows:
    activation = 'relu' if activation == 'RE' or minimalistic else 'hard_swish'
    blocks.append(Block(out, stride, 3 if minimalistic else kernel, expanded / in_channels,
                        squeeze_excite and not minimalistic, activation))
    in_channels = out
  activation = 'relu' if minimalistic else 'hard_swish'
  return Architecture(
      name=name, stem_channels=16, stem_activation=activation, blocks=tuple(blocks),
      channel_rule='keras_v3', scale_stem=False, last_conv_expansion=6,
      pre_logits_channels=pre_logits, head_activation=activation, default_dropout=0.2)


ARCHITECTURES = {
    architecture.name: architecture for architecture in (
        _v1(), _v2(),
        _v3('mobilenet_v3_large', _V3_LARGE, 1280, minimalistic=False),
        _v3('mobilenet_v3_small', _V3_SMALL, 1024, minimalistic=False),
        _v3('mobilenet_v3_large_minimalistic', _V3_LARGE, 1280, minimalistic=True),
        _v3('mobilenet_v3_small_minimalistic', _V3_SMALL, 1024, minimalistic=True))}
NAMES = tuple(ARCHITECTURES)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One block of a variant, with its channel counts resolved."""
  name: str  # The Flax module's name: 'stem', 'block_01', ..., 'last'.
  kind: str  # 'conv' (conv-BN-activation), 'separable' (V1) or 'inverted_residual' (V2/V3).
  in_channels: int
  out_channels: int
  kernel_size: int
  stride: int
  activation: str  # 'relu', 'relu6' or 'hard_swish'.
  expanded_channels: int = 0  # Inverted residual: 0 when the block has no expansion layer.
  se_channels: int = 0  # Squeeze-and-excitation bottleneck (0: none).
  residual: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
  """A whole variant: its stages in order, then pooling, pre-logits and the classifier."""
  architecture: str
  stages: tuple[Stage, ...]
  pre_logits_channels: int = 0
  pre_logits_activation: str = ''

  @property
  def features(self) -> int:
    """Channels into the classifier."""
    return self.pre_logits_channels or self.stages[-1].out_channels


def block_name(index: int) -> str:
  """Parameter-tree name of the index-th (1-based) block."""
  return f'block_{index:02d}'


def plan(name: str = 'mobilenet_v1', *, width_multiplier: float = 1.0, form: str = 'imagenet',
         conv_type: str = 'separable', activation: str = 'relu', min_channels: int = 8,
         input_channels: int = 3) -> Plan:
  """The stages of architecture `name` at a width multiplier and form.

  `conv_type='standard'` (MobileNetV1 only) is the paper's Table 4 baseline:
  every depthwise-separable block becomes one full 3x3 convolution.
  `activation` is MobileNetV1's ('relu' as in the paper, 'relu6' as the
  released checkpoints); V2 and V3 have theirs in their tables.
  """
  if name not in ARCHITECTURES:
    raise ValueError(f'unknown architecture {name!r}; choose one of {NAMES}')
  if form not in STEM_STRIDES:
    raise ValueError(f'unknown form {form!r}; choose one of {tuple(STEM_STRIDES)}')
  if conv_type not in ('separable', 'standard'):
    raise ValueError(f"unknown conv_type {conv_type!r}; choose 'separable' or 'standard'")
  arch = ARCHITECTURES[name]
  if conv_type == 'standard' and arch.channel_rule != 'tf_slim_v1':
    raise ValueError(f"conv_type 'standard' (Conv MobileNet) is defined for mobilenet_v1 only, "
                     f'not {name}')
  alpha = width_multiplier

  def scaled(channels: int) -> int:
    if arch.channel_rule == 'tf_slim_v1':
      return max(int(channels * alpha), min_channels)
    if arch.channel_rule == 'keras_v2':
      return make_divisible(int(channels * alpha))
    return make_divisible(channels * alpha)

  def act(value: str) -> str:
    return activation if value == CONFIGURED else value

  stem = scaled(arch.stem_channels) if arch.scale_stem else arch.stem_channels
  stages = [Stage('stem', 'conv', input_channels, stem, 3, STEM_STRIDES[form],
                  act(arch.stem_activation))]
  channels = stem
  for index, block in enumerate(arch.blocks, start=1):
    out = scaled(block.channels)
    common = dict(name=block_name(index), in_channels=channels, out_channels=out,
                  kernel_size=block.kernel_size, stride=block.stride,
                  activation=act(block.activation))
    if block.expansion == 0:
      stages.append(Stage(kind='separable' if conv_type == 'separable' else 'conv', **common))
    else:
      expanded = (int(block.expansion * channels) if arch.channel_rule == 'keras_v2'
                  else make_divisible(channels * block.expansion))
      if block.expansion == 1:  # The first block of V2 and V3: no expansion layer.
        expanded = channels
      stages.append(Stage(
          kind='inverted_residual', **common,
          expanded_channels=expanded if block.expansion != 1 else 0,
          se_channels=make_divisible(expanded * arch.se_ratio) if block.squeeze_excite else 0,
          residual=block.stride == 1 and channels == out))
    channels = out
  if arch.last_conv_channels or arch.last_conv_expansion:
    if arch.last_conv_expansion:
      last = make_divisible(channels * arch.last_conv_expansion)
    else:
      last = (make_divisible(arch.last_conv_channels * alpha) if alpha > 1
              else arch.last_conv_channels)
    stages.append(Stage('last', 'conv', channels, last, 1, 1, arch.head_activation))
  pre_logits = arch.pre_logits_channels
  if pre_logits and alpha > 1:
    pre_logits = make_divisible(pre_logits * alpha)
  return Plan(name, tuple(stages), pre_logits, arch.head_activation if pre_logits else '')
