"""keras.applications MobileNet weights -> this project's Flax variables.

    import keras
    from mobilenet.models import architectures, keras_weights
    keras_model = keras.applications.MobileNetV2(alpha=0.5, weights='imagenet')
    plan = architectures.plan('mobilenet_v2', width_multiplier=0.5)
    variables = keras_weights.convert(keras_model, plan)
    logits = MobileNet(plan=plan).apply(variables, images)   # images scaled to [-1, 1]

`convert` pairs the Keras model's weighted layers, in the order Keras built
them, with the layers of the plan, in the order the Flax builder creates them,
and checks every pair's kind and shape: a model of another architecture or
width fails with one line naming the first layer that does not fit. Keras'
`MobileNet` (V1, activation ReLU6: build the plan with activation='relu6'),
`MobileNetV2`, `MobileNetV3Large` and `MobileNetV3Small` (minimalistic or
not; `include_preprocessing` either way, since the Rescaling layer has no
weights but then expects images in [0, 255]) with `include_top=True` map one to
one. Layouts: depthwise kernels (k, k, C, 1) -> (k, k, 1, C); 1x1
convolutions that act on pooled features (V1's and V3's classifier, V3's
pre-logits and squeeze-and-excitation layers) -> dense kernels (in, out);
BatchNorm gamma, beta, moving mean and variance -> scale, bias, mean, var.
TensorFlow is not imported here: `keras_model` is any object with Keras'
`layers` and `get_weights()`.
"""
from typing import Any, Iterator

import numpy as np

from mobilenet.models.architectures import Plan

KERAS_KINDS = {'Conv2D': 'conv', 'DepthwiseConv2D': 'depthwise', 'BatchNormalization': 'norm',
               'Dense': 'dense'}


class WeightsMismatch(ValueError):
  """The Keras model is not the architecture or width of the plan."""


def flax_layers(plan: Plan) -> Iterator[tuple[tuple[str, ...], str]]:
  """(module path, kind) of every weighted layer of the plan's model, in creation order."""
  for stage in plan.stages:
    name = stage.name
    if stage.kind == 'conv':
      yield (name, 'conv'), 'conv'
      yield (name, 'bn'), 'norm'
    elif stage.kind == 'separable':
      yield from [((name, 'depthwise'), 'depthwise'), ((name, 'depthwise_bn'), 'norm'),
                  ((name, 'pointwise'), 'conv'), ((name, 'pointwise_bn'), 'norm')]
    else:
      if stage.expanded_channels:
        yield from [((name, 'expand'), 'conv'), ((name, 'expand_bn'), 'norm')]
      yield from [((name, 'depthwise'), 'depthwise'), ((name, 'depthwise_bn'), 'norm')]
      if stage.se_channels:
        yield from [((name, 'se', 'squeeze'), 'dense'), ((name, 'se', 'excite'), 'dense')]
      yield from [((name, 'project'), 'conv'), ((name, 'project_bn'), 'norm')]
  if plan.pre_logits_channels:
    yield ('pre_logits',), 'dense'
  yield ('head',), 'dense'


def _keras_layers(keras_model: Any) -> Iterator[tuple[str, str, list[np.ndarray]]]:
  """(name, kind, weights) of every weighted layer; 1x1 convolutions with a bias count as dense."""
  for layer in keras_model.layers:
    weights = [np.asarray(w) for w in layer.get_weights()]
    if not weights:
      continue
    kind = KERAS_KINDS.get(type(layer).__name__)
    if kind is None:
      raise WeightsMismatch(f'Keras layer {layer.name} ({type(layer).__name__}) has weights but '
                            'no counterpart in a MobileNet')
    if kind == 'conv' and len(weights) == 2 and weights[0].shape[:2] == (1, 1):
      kind, weights = 'dense', [weights[0][0, 0], weights[1]]
    yield layer.name, kind, weights


def _set(tree: dict, path: tuple[str, ...], leaves: dict) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = leaves


def convert(keras_model: Any, plan: Plan) -> dict[str, dict]:
  """{'params': ..., 'batch_stats': ...} for `MobileNet(plan=plan)` from a Keras model's weights.

  The classifier's class count is the Keras model's. Raises WeightsMismatch
  (one line) when the models differ in any layer's kind or shape.
  """
  params, batch_stats = {}, {}
  ours = list(flax_layers(plan))
  theirs = list(_keras_layers(keras_model))
  if len(ours) != len(theirs):
    raise WeightsMismatch(f'the Keras model has {len(theirs)} weighted layers, '
                          f'{plan.architecture} has {len(ours)} at this width: not the same '
                          'architecture')
  for ((path, kind), (keras_name, keras_kind, weights)) in zip(ours, theirs):
    where = f"Keras layer {keras_name} vs {'/'.join(path)}"
    if kind != keras_kind:
      raise WeightsMismatch(f'{where}: a {keras_kind} layer where the plan has a {kind} layer')
    if kind == 'norm':
      gamma, beta, mean, var = weights
      _set(params, path, {'scale': gamma, 'bias': beta})
      _set(batch_stats, path, {'mean': mean, 'var': var})
    elif kind == 'dense':
      _set(params, path, {'kernel': weights[0], 'bias': weights[1]})
    elif kind == 'depthwise':
      kernel = weights[0]
      _set(params, path, {'kernel': kernel.reshape(*kernel.shape[:2], 1, -1)})
    else:
      _set(params, path, {'kernel': weights[0]})
  _check_shapes(plan, params, keras_model)
  return {'params': params, 'batch_stats': batch_stats}


def _check_shapes(plan: Plan, params: dict, keras_model: Any) -> None:
  """Compares every converted leaf with the shapes the Flax model initializes (no compute)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mobilenet.models.mobilenet import MobileNet  # pylint: disable=g-import-not-at-top
  num_classes = params['head']['kernel'].shape[-1]
  size = 64
  expected = jax.eval_shape(
      MobileNet(plan=plan, num_classes=num_classes).init, jax.random.key(0),
      jnp.zeros((1, size, size, plan.stages[0].in_channels)))['params']
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    want = flat_expected.get(path)
    if want is None or tuple(want.shape) != tuple(leaf.shape):
      name = '/'.join(str(getattr(key, 'key', key)) for key in path)
      raise WeightsMismatch(
          f"{keras_model.name}'s {name} has shape {tuple(leaf.shape)}, "
          f'{plan.architecture} expects {None if want is None else tuple(want.shape)}: '
          'not the same architecture or width multiplier')
