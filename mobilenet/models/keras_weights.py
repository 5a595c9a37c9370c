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
`layers` and `get_weights()`; `keras_application` imports Keras when called.

`keras_application(model_config, weights)` builds the Keras model that a
config describes (the one whose weights file fits it) and `official_weights`
names the file Keras downloads for weights='imagenet'.
"""
from typing import Any, Iterator

import numpy as np

from mobilenet.models.architectures import Plan

KERAS_KINDS = {'Conv2D': 'conv', 'DepthwiseConv2D': 'depthwise', 'BatchNormalization': 'norm',
               'Dense': 'dense'}


# Where keras.applications downloads its ImageNet weights from (its BASE_WEIGHT_PATH).
OFFICIAL_WEIGHTS_URL = 'https://storage.googleapis.com/tensorflow/keras-applications/'
# The input sides Keras has V1 and V2 files for; other sides get the 224 file (as Keras does).
_OFFICIAL_SIDES = {'mobilenet_v1': (128, 160, 192, 224), 'mobilenet_v2': (96, 128, 160, 192, 224)}
_OFFICIAL_ALPHAS = {'mobilenet_v1': (0.25, 0.5, 0.75, 1.0),
                    'mobilenet_v2': (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
                    'mobilenet_v3_large': (0.75, 1.0), 'mobilenet_v3_small': (0.75, 1.0),
                    'mobilenet_v3_large_minimalistic': (1.0,),
                    'mobilenet_v3_small_minimalistic': (1.0,)}


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


def keras_application(model_config: Any, weights: str | None = None) -> Any:
  """The keras.applications model `config.model` describes (with its classifier, logits out).

  `weights`: None (random), 'imagenet' (Keras downloads them) or a weights file.
  Keras' V3 is built without its Rescaling layer (weights-free: images come
  scaled to [-1, 1] as for V1 and V2). Raises Keras' ValueError when Keras
  refuses the combination (e.g. ImageNet weights at an alpha it has none for).
  """
  import keras  # pylint: disable=g-import-not-at-top  # Imports TensorFlow: only when asked.
  name = model_config.name
  common = dict(input_shape=(model_config.resolution, model_config.resolution, 3),
                alpha=model_config.width_multiplier, weights=weights,
                classes=model_config.num_classes, classifier_activation=None)
  if name == 'mobilenet_v1':
    return keras.applications.MobileNet(**common)
  if name == 'mobilenet_v2':
    return keras.applications.MobileNetV2(**common)
  build = (keras.applications.MobileNetV3Large if name.startswith('mobilenet_v3_large')
           else keras.applications.MobileNetV3Small)
  return build(**common, minimalistic=name.endswith('_minimalistic'),
               include_preprocessing=False)


def official_weights(model_config: Any) -> tuple[str, str]:
  """(file name, URL) of the ImageNet weights Keras has for `config.model`, as Keras names them.

  Raises WeightsMismatch when Keras has none for its architecture and width.
  """
  name, alpha = model_config.name, float(model_config.width_multiplier)
  alphas = _OFFICIAL_ALPHAS.get(name, ())
  if alpha not in alphas:
    raise WeightsMismatch(f'keras.applications has no ImageNet weights for {name} at width '
                          f'multiplier {alpha:g} (it has {", ".join(f"{a:g}" for a in alphas)})')
  side = model_config.resolution
  if name in _OFFICIAL_SIDES and side not in _OFFICIAL_SIDES[name]:
    side = 224
  if name == 'mobilenet_v1':
    text = {1.0: '1_0', 0.75: '7_5', 0.5: '5_0', 0.25: '2_5'}[alpha]
    return f'mobilenet_{text}_{side}_tf.h5', f'{OFFICIAL_WEIGHTS_URL}mobilenet/' + \
        f'mobilenet_{text}_{side}_tf.h5'
  if name == 'mobilenet_v2':
    file_name = f'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{side}.h5'
    return file_name, f'{OFFICIAL_WEIGHTS_URL}mobilenet_v2/{file_name}'
  variant = name[len('mobilenet_v3_'):]  # large, small, large_minimalistic, small_minimalistic
  file_name = f'weights_mobilenet_v3_{variant}_224_{alpha}_float.h5'
  return file_name, f'{OFFICIAL_WEIGHTS_URL}mobilenet_v3/{file_name}'
