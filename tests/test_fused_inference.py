"""The fused-inference transformation computes the model's own function, and refuses what it cannot."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.models import architectures, fused_inference
from mobilenet.models.mobilenet import MobileNet
from mobilenet.ops import batch_norm, depthwise, pointwise, separable
from mobilenet.ops.cpu import kernels as cpu_kernels

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason='needs a C++ compiler')


def v1(form='cifar', alpha=0.25, activation='relu', **kwargs):
  plan = architectures.plan('mobilenet_v1', width_multiplier=alpha, form=form,
                            activation=activation)
  return MobileNet(plan=plan, num_classes=5, **kwargs)


def trained_looking_variables(model, images):
  """Initial variables with BatchNorm's scale, bias, mean and var moved off 1, 0, 0, 1."""
  variables = model.init(jax.random.key(0), images)
  leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
  rng = np.random.default_rng(0)
  moved = []
  for path, leaf in leaves:
    name = path[-1].key
    noise = rng.uniform(0.5, 1.5, leaf.shape) if name in ('scale', 'var') else (
        rng.normal(0.0, 0.3, leaf.shape) if name in ('bias', 'mean') else None)
    moved.append(leaf if noise is None or path[-2].key == 'head' else
                 (leaf * noise if name in ('scale', 'var') else leaf + noise).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(tree, moved)


@needs_kernels
@pytest.mark.parametrize('form,resolution,alpha,activation', [
    pytest.param('cifar', 32, 0.25, 'relu',  # Every depthwise layer on the fused C++ loop.
                 marks=pytest.mark.slow),
    pytest.param('cifar', 16, 0.3, 'relu6',  # 9, 19, 38 ... channels: the XLA steps around the kernel.
                 marks=pytest.mark.slow),
    ('imagenet', 64, 0.25, 'relu'),  # Stem at stride 2.
])
def test_fused_inference_matches_layer_by_layer(form, resolution, alpha, activation):
  images = jax.random.normal(jax.random.key(1), (3, resolution, resolution, 3))
  model = v1(form, alpha, activation)
  fused = fused_inference.inference_fn(model)
  assert fused is not None
  variables = trained_looking_variables(model, images)
  for ops in ('fast', 'plain'):
    want = jax.jit(model.clone(ops=ops).apply)(variables, images)
    have = jax.jit(fused)(variables, images)
    assert np.std(want) > 0.1  # The activations were not all clipped away.
    np.testing.assert_allclose(have, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('size,channels,activations,spatial', [
    (3, 16, (jax.nn.relu6, jax.nn.relu6), (9, 8)),  # MobileNetV1 (Keras), V2.
    (3, 24, (jax.nn.hard_swish, jax.nn.relu), (9, 8)),  # A V3 block after a hard-swish one...
    (5, 8, (jax.nn.relu, jax.nn.hard_swish), (9, 8)),  # V3's 5x5 layers.
    (5, 16, (batch_norm.identity, jax.nn.hard_swish), (9, 8)),  # After a materialized input.
    # Maps no larger than the filter (V3's last blocks and V1's at 32x32): only the taps that
    # land on the image are taken.
    (5, 24, (jax.nn.hard_swish, jax.nn.hard_swish), (2, 2)),
    (5, 16, (jax.nn.relu, batch_norm.identity), (4, 3)),
    (3, 32, (jax.nn.relu6, jax.nn.relu6), (2, 2)),
    (3, 8, (jax.nn.relu, jax.nn.relu), (3, 1)),
    # Rows too wide for one band in L2: the image is taken in bands (three at stride 1).
    (3, 64, (jax.nn.relu6, jax.nn.relu6), (70, 64)),
    (5, 64, (jax.nn.relu, jax.nn.hard_swish), (67, 64)),
])
def test_fused_depthwise_matches_its_definition(size, channels, activations, spatial):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, *spatial, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(size, size, 1, channels)), jnp.float32)
  a, b, a2, b2 = (jnp.asarray(rng.normal(size=channels), jnp.float32) for _ in range(4))
  before, after = activations
  for strides in ((1, 1), (2, 2)):
    want = after(depthwise.depthwise_conv(before(x * a + b), kernel, strides=strides,
                                          implementation='xla') * a2 + b2)
    have = depthwise.depthwise_conv_inference(x, kernel, input_affine=(a, b),
                                              output_affine=(a2, b2), input_activation=before,
                                              output_activation=after, strides=strides)
    assert np.std(want) > 0.1
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
  if cpu_kernels.available():  # The one-pass kernel, not the XLA steps, computed it.
    hlo = jax.jit(lambda x: depthwise.depthwise_conv_inference(
        x, kernel, input_affine=(a, b), output_affine=(a2, b2), input_activation=before,
        output_activation=after)).lower(x).as_text()
    assert 'mobilenet_depthwise_inference' in hlo


@pytest.mark.parametrize('shape,out_channels,activation,residual,gated', [
    ((2, 4, 4, 144), 24, batch_norm.identity, True, True),  # V3's gated projection + residual.
    ((3, 5, 7, 13), 40, jax.nn.relu, False, True),  # Rows not a multiple of 6; 40 = 32 + 8.
    ((2, 3, 3, 600), 136, jax.nn.relu6, True, False),  # Input channels in 3 chunks; 2 panels + 8.
    ((4, 2, 2, 300), 72, jax.nn.hard_sigmoid, False, True),  # Squeeze-and-excitation's excite.
    ((5, 288), 1024, jax.nn.hard_swish, False, False),  # Pre-logits: 16 full panels.
    ((7, 16), 8, jax.nn.relu, True, False),  # One 8-lane vector wide.
    ((1, 1, 1, 3), 56, batch_norm.identity, False, False),  # One row.
    ((2, 16, 16, 40), 264, jax.nn.relu, True, True),  # 512 rows, 4 full tiles and an 8-wide one.
    ((1, 32, 16, 300), 256, jax.nn.hard_swish, False, False),  # 2 chunks of input channels.
])
def test_fused_pointwise_matches_its_definition(shape, out_channels, activation, residual,
                                                gated):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(shape[-1], out_channels)) / np.sqrt(shape[-1]),
                       jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, out_channels), jnp.float32)
  bias = jnp.asarray(rng.normal(size=out_channels), jnp.float32)
  added = jnp.asarray(rng.normal(size=(*shape[:-1], out_channels)), jnp.float32) if residual else None
  gate = jnp.asarray(rng.uniform(0.0, 1.0, (shape[0], shape[-1])), jnp.float32) if gated else None
  gated_x = x if gate is None else x * gate.reshape(shape[0], *(1,) * (x.ndim - 2), shape[-1])
  want = activation(jnp.einsum('...c,cd->...d', gated_x, kernel,
                               precision=jax.lax.Precision.HIGHEST) * scale + bias)
  want = want if added is None else want + added
  fused = jax.jit(functools.partial(pointwise.pointwise_inference, activation=activation))
  have = fused(x, kernel, scale=scale, bias=bias, residual=added, gate=gate)
  assert np.std(want) > 0.1
  np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
  # vmapped (calls.py folds the vmapped axis into the batch) and differentiated (the XLA form's VJP).
  np.testing.assert_allclose(
      jax.vmap(lambda x: fused(x, kernel, scale=scale, bias=bias, residual=added, gate=gate))(
          jnp.stack([x, 2 * x])), jnp.stack([have, fused(2 * x, kernel, scale=scale, bias=bias,
                                                          residual=added, gate=gate)]),
      rtol=1e-5, atol=1e-5)  # Rounding: a row may fall in a tile of other height (1.5e-6 seen).
  grads = jax.grad(lambda k: jnp.sum(fused(x, k, scale=scale, bias=bias, residual=added,
                                           gate=gate) ** 2))(kernel)
  want_grads = jax.grad(lambda k: jnp.sum(pointwise._inference_xla(
      x, k, scale, bias, added, gate, activation) ** 2))(kernel)
  np.testing.assert_allclose(grads, want_grads, rtol=1e-3, atol=1e-3)  # Sums of 512 products.
  if cpu_kernels.available():  # The kernel, not the XLA steps, computed it.
    hlo = jax.jit(lambda x: fused(x, kernel, scale=scale, bias=bias, residual=added,
                                  gate=gate)).lower(x).as_text()
    assert 'mobilenet_pointwise_inference' in hlo


def _check_batched_differentiated_and_one_kernel(run, x, kernel, have, definition):
  """`run(x, kernel)` (which gave `have`) vmapped (calls.py folds the vmapped axis into the batch),
  differentiated (its gradient is `definition(kernel)`'s: the operations in turn), and computed by
  the one kernel, no 1x1 product a call of its own."""
  np.testing.assert_allclose(jax.vmap(run)(jnp.stack([x, 2 * x])),
                             jnp.stack([have, run(2 * x)]), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda k: jnp.sum(run(x, k) ** 2))(kernel)
  want_grads = jax.grad(lambda k: jnp.sum(definition(k) ** 2))(kernel)
  np.testing.assert_allclose(grads, want_grads, rtol=1e-3, atol=1e-3)
  if cpu_kernels.available():
    hlo = jax.jit(run).lower(x).as_text()
    assert 'mobilenet_separable_inference' in hlo and 'mobilenet_pointwise_inference' not in hlo


@pytest.mark.parametrize('size,spatial,channels,out_channels,activations,residual', [
    (3, (9, 8), 16, 32, (jax.nn.relu, jax.nn.relu), False),  # V1: 32 = 2 x 16 or 1 x 32 lanes.
    (3, (70, 64), 64, 136, (jax.nn.relu6, jax.nn.relu6), True),  # Bands; 2 panels + 8; V2's add.
    (5, (9, 8), 24, 40, (jax.nn.hard_swish, jax.nn.relu), True),  # 5x5; 40 = 32 + 8.
    (3, (11, 13), 264, 8, (batch_norm.identity, jax.nn.relu6), False),  # 2 chunks of channels.
    (5, (2, 2), 16, 24, (jax.nn.relu, jax.nn.hard_swish), True),  # A map no larger than the filter.
    (3, (3, 1), 8, 16, (jax.nn.relu, jax.nn.relu), False),
])
def test_separable_inference_matches_its_definition(size, spatial, channels, out_channels,
                                                    activations, residual):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(3, *spatial, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(size, size, 1, channels)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(channels, out_channels)) / np.sqrt(channels), jnp.float32)
  a, b, a2, b2 = (jnp.asarray(rng.normal(size=channels), jnp.float32) for _ in range(4))
  scale = jnp.asarray(rng.uniform(0.5, 2.0, out_channels), jnp.float32)
  bias = jnp.asarray(rng.normal(size=out_channels), jnp.float32)
  before, after = activations
  for strides in ((1, 1), (2, 2)):
    out_shape = (3, -(-spatial[0] // strides[0]), -(-spatial[1] // strides[1]), out_channels)
    added = jnp.asarray(rng.normal(size=out_shape), jnp.float32) if residual else None
    fused = jax.jit(functools.partial(
        separable.separable_inference, input_activation=before, output_activation=after,
        strides=strides))
    run = lambda x, k=kernel: fused(x, k, w, input_affine=(a, b), output_affine=(a2, b2),
                                    scale=scale, bias=bias, residual=added)
    # Its definition, on XLA's operations throughout.
    y = after(depthwise.depthwise_conv(before(x * a + b), kernel, strides=strides,
                                       implementation='xla') * a2 + b2)
    want = jnp.einsum('...c,cd->...d', y, w, precision=jax.lax.Precision.HIGHEST) * scale + bias
    want = want if added is None else want + added
    have = run(x)
    assert have.shape == out_shape and np.std(want) > 0.1
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4)
    settings = (strides, 'SAME', depthwise.explicit_padding(spatial, (size, size), strides, 'SAME'),
                before, after, None, False, False)
    _check_batched_differentiated_and_one_kernel(
        run, x, kernel, have, lambda k: separable._separable_xla(
            x, k, a, b, a2, b2, w, scale, bias, added, None, None, settings))


def _layer_operands(rng, size, channels, out_channels):
  """A random depthwise kernel, the four affine vectors around it, and the projection's kernel,
  scale and bias (None without `out_channels`)."""
  kernel = jnp.asarray(rng.normal(size=(size, size, 1, channels)), jnp.float32)
  affines = tuple(jnp.asarray(rng.normal(size=channels), jnp.float32) for _ in range(4))
  if out_channels is None:
    return kernel, affines, (None, None, None)
  w = jnp.asarray(rng.normal(size=(channels, out_channels)) / np.sqrt(channels), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, out_channels), jnp.float32)
  bias = jnp.asarray(rng.normal(size=out_channels), jnp.float32)
  return kernel, affines, (w, scale, bias)


def _projected(y, w, scale, bias, residual=None):
  """The projection's definition: y @ w at HIGHEST precision, its BatchNorm and residual."""
  y = jnp.einsum('...c,cd->...d', y, w, precision=jax.lax.Precision.HIGHEST) * scale + bias
  return y if residual is None else y + residual


@pytest.mark.parametrize('size,spatial,block_channels,channels,out_channels,activations', [
    (3, (70, 64), 24, 64, 24, (jax.nn.relu6, jax.nn.relu6)),  # V2: bands share expanded rows.
    (5, (9, 8), 16, 40, None, (jax.nn.hard_swish, jax.nn.hard_swish)),  # SE's: no projection.
    (5, (40, 36), 16, 96, 24, (jax.nn.hard_swish, jax.nn.relu)),  # 5x5 bands: the padded copy.
    (3, (13, 11), 12, 72, 40, (jax.nn.relu, jax.nn.relu)),  # 12 summed; 40 = 32 + 8 outputs.
    (5, (4, 4), 16, 48, 24, (jax.nn.relu, jax.nn.hard_swish)),  # A map no larger than the filter.
])
def test_separable_inference_with_the_expansion_matches_its_definition(
    size, spatial, block_channels, channels, out_channels, activations):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(3, *spatial, block_channels)), jnp.float32)
  expand = jnp.asarray(rng.normal(size=(block_channels, channels)) / np.sqrt(block_channels),
                       jnp.float32)
  kernel, (a, b, a2, b2), (w, scale, bias) = _layer_operands(rng, size, channels, out_channels)
  projecting = out_channels is not None
  before, after = activations
  for strides in ((1, 1), (2, 2)):
    residual = x if projecting and strides == (1, 1) and out_channels == block_channels else None
    run = jax.jit(lambda x, k=kernel: separable.separable_inference(
        x, k, w, input_affine=(a, b), output_affine=(a2, b2), input_activation=before,
        output_activation=after, scale=scale, bias=bias, residual=residual, expand_kernel=expand,
        strides=strides))
    # Its definition, on XLA's operations throughout.
    expanded = jnp.einsum('...c,cd->...d', x, expand, precision=jax.lax.Precision.HIGHEST)
    want = after(depthwise.depthwise_conv(before(expanded * a + b), kernel, strides=strides,
                                          implementation='xla') * a2 + b2)
    if projecting:
      want = _projected(want, w, scale, bias, residual)
    have = run(x)
    assert have.shape == want.shape and np.std(want) > 0.1
    np.testing.assert_allclose(have, want, rtol=2e-4, atol=2e-4)
    settings = (strides, 'SAME', depthwise.explicit_padding(spatial, (size, size), strides, 'SAME'),
                before, after, None, False, False)
    _check_batched_differentiated_and_one_kernel(  # The expansion and projection inside it too.
        run, x, kernel, have, lambda k: separable._separable_xla(
            x, k, a, b, a2, b2, w, scale, bias, residual, expand, None, settings))


@pytest.mark.parametrize('stem_strides,spatial,channels,size,out_channels,activations,add_input', [
    (1, (9, 8), 16, 3, 32, (jax.nn.relu, jax.nn.relu), False),  # V1, V2 at 32x32: stride-1 stem.
    (2, (150, 64), 64, 3, 16, (jax.nn.relu6, jax.nn.relu6), False),  # 224: bands share stem rows.
    (2, (33, 31), 24, 5, None, (jax.nn.hard_swish, jax.nn.relu), False),  # Odd; no projection.
    (1, (4, 4), 16, 5, 24, (jax.nn.hard_swish, jax.nn.hard_swish), False),  # No larger than K.
    # V3-Large's first block: the stem's activated output added back (stride 1 only).
    (2, (150, 64), 16, 3, 16, (jax.nn.hard_swish, jax.nn.relu), True),
    (1, (4, 4), 8, 5, 8, (jax.nn.hard_swish, jax.nn.relu), True),
])
def test_separable_inference_with_the_stem_matches_its_definition(
    stem_strides, spatial, channels, size, out_channels, activations, add_input):
  rng = np.random.default_rng(7)
  images = jnp.asarray(rng.normal(size=(3, *spatial, 3)), jnp.float32)
  stem = jnp.asarray(rng.normal(size=(3, 3, 3, channels)) / np.sqrt(27), jnp.float32)
  kernel, (a, b, a2, b2), (w, scale, bias) = _layer_operands(rng, size, channels, out_channels)
  projecting = out_channels is not None
  before, after = activations
  stem_out = jax.lax.conv_general_dilated(images, stem, (stem_strides,) * 2, 'SAME',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                          precision=jax.lax.Precision.HIGHEST)
  for strides in ((1, 1),) if add_input else ((1, 1), (2, 2)):
    run = jax.jit(lambda x, k=kernel: separable.separable_inference(
        x, k, w, input_affine=(a, b), output_affine=(a2, b2), input_activation=before,
        output_activation=after, scale=scale, bias=bias, stem_kernel=stem,
        stem_strides=stem_strides, residual_from_input=add_input, strides=strides))
    # Its definition, on XLA's operations throughout.
    want = after(depthwise.depthwise_conv(before(stem_out * a + b), kernel, strides=strides,
                                          implementation='xla') * a2 + b2)
    if projecting:
      want = _projected(want, w, scale, bias, before(stem_out * a + b) if add_input else None)
    have = run(images)
    assert have.shape == want.shape and np.std(want) > 0.1
    np.testing.assert_allclose(have, want, rtol=2e-4, atol=2e-4)
    settings = (strides, 'SAME', depthwise.explicit_padding(stem_out.shape[1:3], (size, size),
                                                            strides, 'SAME'),
                before, after, (stem_strides, depthwise.explicit_padding(
                    spatial, (3, 3), (stem_strides,) * 2, 'SAME'), stem_out.shape[1:3]), add_input, False)
    _check_batched_differentiated_and_one_kernel(  # The stem and projection inside it too.
        run, images, kernel, have, lambda k: separable._separable_xla(
            images, k, a, b, a2, b2, w, scale, bias, None, None, stem, settings))
    if cpu_kernels.available():
      assert 'mobilenet_conv_forward' not in jax.jit(run).lower(images).as_text()


@pytest.mark.parametrize('size,spatial,channels,expanded_from', [
    (3, (9, 8), 16, None),  # A depthwise layer's output and its mean, nothing in front.
    (5, (70, 64), 24, 8),  # Bands of 5x5, the expansion in front.
    (3, (11, 13), 72, 16),  # Bands of 3x3, read where computed.
    (5, (4, 4), 40, None),  # A map no larger than the filter (V3's in the cifar form).
    (5, (2, 2), 48, 16),
])
def test_separable_inference_pools_for_squeeze_and_excitation(size, spatial, channels,
                                                              expanded_from):
  """Without a projection the kernel also returns each image's mean output (SE's pooling)."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(3, *spatial, expanded_from or channels)), jnp.float32)
  expand = (None if expanded_from is None else jnp.asarray(
      rng.normal(size=(expanded_from, channels)) / np.sqrt(expanded_from), jnp.float32))
  kernel = jnp.asarray(rng.normal(size=(size, size, 1, channels)), jnp.float32)
  a, b, a2, b2 = (jnp.asarray(rng.normal(size=channels), jnp.float32) for _ in range(4))
  for strides in ((1, 1), (2, 2)):
    layer = functools.partial(
        separable.separable_inference, input_affine=(a, b), output_affine=(a2, b2),
        input_activation=jax.nn.hard_swish, output_activation=jax.nn.relu, expand_kernel=expand,
        strides=strides)
    y, mean = jax.jit(lambda x: layer(x, kernel, with_mean=True))(x)
    np.testing.assert_array_equal(y, jax.jit(lambda x: layer(x, kernel))(x))
    assert mean.shape == (3, channels) and np.std(mean) > 0.1
    np.testing.assert_allclose(mean, jnp.mean(y, axis=(1, 2)), rtol=1e-5, atol=1e-5)
    if cpu_kernels.available():  # Summed inside the kernel: no reduction of XLA's left.
      assert 'reduce' not in jax.jit(lambda x: layer(x, kernel, with_mean=True)[1]).lower(
          x).compile().as_text().split('ENTRY')[1]


@needs_kernels
@pytest.mark.parametrize('name,alpha', [
    ('mobilenet_v2', 0.35),  # Expansions, residuals, ReLU6, the last 1x1 convolution.
    ('mobilenet_v3_small', 0.5),  # SE, hard-swish, 5x5, pre-logits.
    pytest.param('mobilenet_v3_large', 0.5, marks=pytest.mark.slow),  # A residual first block.
    pytest.param('mobilenet_v3_large_minimalistic', 0.5, marks=pytest.mark.slow),
])
def test_fused_inference_matches_layer_by_layer_for_the_family(name, alpha):
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  model = MobileNet(plan=architectures.plan(name, width_multiplier=alpha, form='cifar'),
                    num_classes=5)
  fused = fused_inference.inference_fn(model)
  assert fused is not None
  variables = trained_looking_variables(model, images)
  want = jax.jit(model.clone(ops='plain').apply)(variables, images)
  have = jax.jit(fused)(variables, images)
  assert np.std(want) > 0.1
  np.testing.assert_allclose(have, want, rtol=2e-4, atol=2e-4)


@needs_kernels
@pytest.mark.parametrize('form,resolution,one_kernel_blocks', [
    ('cifar', 32, 1),  # The first block, with the stem; the rest on maps of 16x16 and less.
    ('imagenet', 224, 5),  # 112x112 to 28x28 (blocks 1-5); 14x14 and 7x7 on two kernels.
])
def test_v1_takes_the_one_kernel_where_it_measured_faster(form, resolution, one_kernel_blocks):
  model = v1(form, alpha=0.5)
  images = jnp.zeros((1, resolution, resolution, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  hlo = jax.jit(fused_inference.inference_fn(model)).lower(variables, images).as_text()
  assert hlo.count('@mobilenet_separable_inference(') == one_kernel_blocks
  assert '@mobilenet_conv_forward(' not in hlo  # The stem inside the first block's kernel.


@needs_kernels
def test_only_what_it_computes_is_fused():
  base = v1()
  assert fused_inference.unsupported_reason(base) is None
  for name in architectures.NAMES:
    assert fused_inference.unsupported_reason(MobileNet(plan=architectures.plan(name))) is None
  refused = [base.clone(dtype=jnp.bfloat16), base.clone(ops='plain'),
             base.clone(depthwise_implementation='xla'),
             v1().clone(plan=architectures.plan('mobilenet_v1', conv_type='standard'))]
  for model in refused:
    assert fused_inference.inference_fn(model) is None
    apply_fn, path = fused_inference.eval_apply(model, fused=True)
    assert path.startswith('eval: layer by layer (')
  _, path = fused_inference.eval_apply(base, fused=True)
  assert path == 'eval: BatchNorms fused into the C++ depthwise and pointwise kernels'
  _, path = fused_inference.eval_apply(base, fused=False)
  assert 'fused_inference is off' in path
