"""The fused-inference transformation computes the model's own function, and refuses what it cannot."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.models import architectures, fused_inference
from mobilenet.models.mobilenet import MobileNet
from mobilenet.ops import depthwise
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


def test_fused_depthwise_matches_its_definition():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 9, 8, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 16)), jnp.float32)
  a, b, a2, b2 = (jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(4))
  for strides in ((1, 1), (2, 2)):
    want = jnp.clip(depthwise.depthwise_conv(jnp.clip(x * a + b, 0.0, 6.0), kernel,
                                             strides=strides, implementation='xla') * a2 + b2,
                    0.0, 6.0)
    have = depthwise.depthwise_conv_inference(x, kernel, input_affine=(a, b),
                                              output_affine=(a2, b2), bounds=(0.0, 6.0),
                                              strides=strides)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_only_what_it_computes_is_fused():
  base = v1()
  assert fused_inference.unsupported_reason(base) is None
  refused = [base.clone(dtype=jnp.bfloat16), base.clone(ops='plain'),
             base.clone(depthwise_implementation='xla'),
             v1().clone(plan=architectures.plan('mobilenet_v1', conv_type='standard'))]
  refused += [MobileNet(plan=architectures.plan(name)) for name in architectures.NAMES[1:]]
  for model in refused:
    assert fused_inference.inference_fn(model) is None
    apply_fn, path = fused_inference.eval_apply(model, fused=True)
    assert path.startswith('eval: layer by layer (')
  _, path = fused_inference.eval_apply(base, fused=True)
  assert path == 'eval: BatchNorms fused into the C++ depthwise kernel'
  _, path = fused_inference.eval_apply(base, fused=False)
  assert 'fused_inference is off' in path
