"""One builder for the MobileNet family: a plan's stages as Flax blocks, then pooling and the classifier.

`MobileNet(plan=architectures.plan('mobilenet_v2', width_multiplier=0.5))`
is MobileNetV2 at alpha 0.5; `create_model(config.model)` builds what a
config describes. Every convolution is followed by BatchNorm (epsilon 1e-3)
and 'SAME' padding is TensorFlow's, so TF-slim / Keras weights map one to one
(models/keras_weights.py). After the stages: global average pooling, the
pre-logits layer where the architecture has one (V3), dropout and a dense
classifier with bias. `dtype` is the compute dtype (parameters stay float32;
logits come back float32). `ops` picks the modules the blocks are built with
('fast' or 'plain', ops/op_sets.py); both compute the same function.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mobilenet.models import architectures, blocks
from mobilenet.ops import op_sets

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class MobileNet(nn.Module):
  """A MobileNet classifier. Inputs: NHWC images; outputs: float32 logits."""
  plan: architectures.Plan
  num_classes: int = 1000
  dropout_rate: float = 0.0
  batch_norm_momentum: float = 0.9
  batch_norm_epsilon: float = 1e-3
  dtype: Any = jnp.float32
  ops: str = 'fast'
  depthwise_implementation: str = 'auto'  # The 'fast' ops' depthwise kernel (ops/select.py).
  fused_training: bool = True  # The 'fast' ops fuse BatchNorm into the depthwise layer it feeds.

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    ops = op_sets.op_set(self.ops, train=train, dtype=self.dtype,
                         batch_norm_momentum=self.batch_norm_momentum,
                         batch_norm_epsilon=self.batch_norm_epsilon,
                         depthwise_implementation=self.depthwise_implementation,
                         fused_training=self.fused_training)
    x, pending_norm = images.astype(self.dtype), None
    for stage, following in zip(self.plan.stages, self.plan.stages[1:] + (None,)):
      # In training, a block's last norm that feeds only the next block's depthwise layer is
      # handed to that layer (blocks.py), which the fast ops fuse with it: the activated tensor
      # between the blocks is then never stored. Inference keeps each norm in its block.
      hand_off = (train and self.fused_training and following is not None
                  and reads_input_only_in_depthwise(following))
      block = self._block(stage, ops)
      handed = {} if pending_norm is None else {'input_norm': pending_norm}
      if hand_off:
        x, pending_norm = block(x, hand_off_norm=True, **handed)
      else:
        x, pending_norm = block(x, **handed), None
    x = jnp.mean(x, axis=(1, 2))
    if self.plan.pre_logits_channels:
      x = nn.Dense(self.plan.pre_logits_channels, dtype=self.dtype, name='pre_logits')(x)
      x = blocks.ACTIVATIONS[self.plan.pre_logits_activation](x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)

  def _block(self, stage: architectures.Stage, ops: op_sets.OpSet) -> nn.Module:
    common = dict(features=stage.out_channels, kernel_size=stage.kernel_size,
                  strides=stage.stride, activation=stage.activation, conv=ops.conv,
                  norm=ops.norm, name=stage.name)
    if stage.kind == 'conv':
      return blocks.ConvNormActivation(**common)
    if stage.kind == 'separable':
      return blocks.DepthwiseSeparable(**common)
    return blocks.InvertedResidual(
        **common, expanded_features=stage.expanded_channels, se_features=stage.se_channels,
        residual=stage.residual, dtype=self.dtype)


def reads_input_only_in_depthwise(stage: architectures.Stage) -> bool:
  """Whether `stage` starts with its depthwise layer and uses its input nowhere else."""
  return stage.kind == 'separable' or (stage.kind == 'inverted_residual'
                                       and not stage.expanded_channels and not stage.residual)


def model_plan(model_config: ml_collections.ConfigDict,
               input_channels: int = 3) -> architectures.Plan:
  """The plan of the network `config.model` describes."""
  return architectures.plan(
      model_config.name, width_multiplier=model_config.width_multiplier,
      form=model_config.form, conv_type=model_config.conv_type,
      activation=model_config.activation, min_channels=model_config.min_channels,
      input_channels=input_channels)


def create_model(model_config: ml_collections.ConfigDict) -> MobileNet:
  """Builds the model that `config.model` describes."""
  return MobileNet(
      plan=model_plan(model_config),
      num_classes=model_config.num_classes,
      dropout_rate=model_config.dropout_rate,
      batch_norm_momentum=model_config.batch_norm_momentum,
      batch_norm_epsilon=model_config.batch_norm_epsilon,
      dtype=DTYPES[model_config.dtype],
      ops=model_config.ops,
      depthwise_implementation=model_config.depthwise_implementation,
      fused_training=model_config.fused_training)
