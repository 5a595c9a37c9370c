"""BatchNorm followed by the activation, as one module with a hand-written VJP.

Computes exactly what `activation(nn.BatchNorm(...)(x))` computes (same
parameters `scale` and `bias`, same statistics `mean` and `var`, same momentum
update, biased batch variance E[x^2] - E[x]^2 clipped at zero, float32
statistics for bfloat16 inputs), but with fewer passes over the activations.
Autodiff of Flax's BatchNorm keeps the centred input and the normalized output
alive for the backward pass and reduces over the batch several times; XLA:CPU
then runs each of those passes as a separate loop, and BatchNorm took about
40% of a training step (docs/performance.md). Here the backward pass keeps only
the layer's input, recomputes the normalized values inside its fused loops, and
needs two reductions (sum of the incoming gradient and of its product with the
normalized input) and one elementwise pass for the input gradient.

Statistics are over every axis but the last (channels). Under `jax.jit` with
the batch sharded over a mesh, those reductions are over the global batch: XLA
all-reduces them, and the C++ kernels run on each device's shard with their
sums all-reduced (ops/cpu/calls.py).
"""
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobilenet.ops import select
from mobilenet.ops.cpu import calls
from mobilenet.ops.cpu import kernels as cpu_kernels


def _coefficients(mean, inv_std, scale, bias):
  """Per-channel (a, b) with normalized * scale + bias = x * a + b."""
  a = inv_std * scale
  return a, bias - mean * a


def inference_affine(params, batch_stats, epsilon: float):
  """(a, b) with inference-mode BatchNorm(x) = x * a + b, from a module's variables."""
  inv_std = jax.lax.rsqrt(batch_stats['var'] + epsilon)
  return _coefficients(batch_stats['mean'], inv_std, params['scale'], params['bias'])


def _statistics(x):
  """Float32 batch mean and biased variance over all axes but the last."""
  axes = tuple(range(x.ndim - 1))
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axes)
  mean_of_squares = jnp.mean(jnp.square(x), axes)
  return mean, jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)


def _forward(x, scale, bias, epsilon, activation, dtype):
  mean, var = _statistics(x)
  inv_std = jax.lax.rsqrt(var + epsilon)
  a, b = _coefficients(mean, inv_std, scale, bias)
  y = activation(x.astype(jnp.float32) * a + b).astype(dtype)
  return y, mean, var, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _xla_train(x, scale, bias, epsilon, activation, dtype):
  """(activation(BN(x)), batch mean, batch var) in plain XLA, with the VJP below."""
  y, mean, var, _ = _forward(x, scale, bias, epsilon, activation, dtype)
  return y, mean, var


def _xla_train_fwd(x, scale, bias, epsilon, activation, dtype):
  y, mean, var, inv_std = _forward(x, scale, bias, epsilon, activation, dtype)
  return (y, mean, var), (x, mean, inv_std, scale, bias)


def _xla_train_bwd(epsilon, activation, dtype, residuals, cotangents):
  # The statistics feed only the running averages (not differentiated), so
  # their cotangents are ignored.
  del epsilon, dtype
  x, mean, inv_std, scale, bias = residuals
  dy = cotangents[0].astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  xf = x.astype(jnp.float32)
  a, b = _coefficients(mean, inv_std, scale, bias)
  _, activation_vjp = jax.vjp(activation, xf * a + b)
  g = activation_vjp(dy)[0]  # Gradient at the BatchNorm's output.
  normalized = (xf - mean) * inv_std
  d_bias = jnp.sum(g, axes)
  d_scale = jnp.sum(g * normalized, axes)
  # dx = scale * inv_std * (g - mean(g) - normalized * mean(g * normalized)).
  dx = a * (g - d_bias / count - normalized * (d_scale / count))
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_xla_train.defvjp(_xla_train_fwd, _xla_train_bwd)


def identity(x):
  """No activation: the linear bottleneck's BatchNorm (MobileNetV2/V3 projections)."""
  return x


# The activations the C++ kernels compute, as (kind, lo, hi): kind 0 is clip(z, lo, hi), kind 1
# hard-swish (cpu_vectors.h's ActivationKind; lo and hi unused).
KERNEL_ACTIVATIONS = {nn.relu: (0, 0.0, float('inf')), jax.nn.relu6: (0, 0.0, 6.0),
                      identity: (0, float('-inf'), float('inf')),
                      jax.nn.hard_swish: (1, float('-inf'), float('inf'))}


def _kernel_attributes(kernel_activation) -> dict:
  kind, lo, hi = kernel_activation
  return {'activation': np.int32(kind), 'lo': np.float32(lo), 'hi': np.float32(hi)}


def _activation_affine(x, a, b, kernel_activation):
  """What the 'apply' kernel computes, in XLA: its reference and its VJP."""
  kind, lo, hi = kernel_activation
  z = x * a + b
  return jax.nn.hard_swish(z) if kind == 1 else jnp.clip(z, lo, hi)


IMPLEMENTATIONS = select.IMPLEMENTATIONS['batch_norm']


def _global_statistics(outputs, axes):
  """Per-shard (mean, var) over equal shards -> the global batch's, as _statistics computes them."""
  mean, var = outputs
  global_mean = jax.lax.pmean(mean, axes)
  mean_of_squares = jax.lax.pmean(var + jnp.square(mean), axes)
  return global_mean, jnp.maximum(mean_of_squares - jnp.square(global_mean), 0.0)


# Per kernel: its combine over the batch shards (calls.py), None for the
# per-example ones. Statistics and backward sums reduce over the batch.
_COMBINE = {'stats': _global_statistics, 'apply': None,
            'backward_sums': calls.psum_combine, 'backward_input': None}


def _kernel(name, out_shapes, *operands, **attributes):
  """Calls a kernel whose operands after x (and dy) are per-channel; sharded and vmappable."""
  single = not isinstance(out_shapes, tuple)
  with_dy = name.startswith('backward')
  batched = [True, with_dy] + [False] * (len(operands) - 2) if with_dy else [True] + [False] * (
      len(operands) - 1)
  outputs = calls.kernel_call(f'mobilenet_batch_norm_{name}',
                              [out_shapes] if single else out_shapes, operands, batched=batched,
                              combine=_COMBINE[name], **attributes)
  return outputs[0] if single else outputs


def kernel_statistics(x, scale, bias, epsilon):
  """Batch (mean, var) of float32 `x` on the C++ kernel, with 1/std and the affine (a, b) they give."""
  channels = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
  mean, var = _kernel('stats', (channels, channels), x)
  inv_std = jax.lax.rsqrt(var + epsilon)
  return mean, var, inv_std, _coefficients(mean, inv_std, scale, bias)


def _kernel_forward(x, scale, bias, epsilon, kernel_activation):
  mean, var, inv_std, (a, b) = kernel_statistics(x, scale, bias, epsilon)
  y = _kernel('apply', jax.ShapeDtypeStruct(x.shape, jnp.float32), x, a, b,
              **_kernel_attributes(kernel_activation))
  return y, mean, var, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_apply(x, a, b, kernel_activation):
  """activation(x * a + b) on the kernel (inference mode), differentiable through XLA's form."""
  return _kernel('apply', jax.ShapeDtypeStruct(x.shape, jnp.float32), x, a, b,
                 **_kernel_attributes(kernel_activation))


def _kernel_apply_fwd(x, a, b, kernel_activation):
  return _kernel_apply(x, a, b, kernel_activation), (x, a, b)


def _kernel_apply_bwd(kernel_activation, residuals, g):
  # Gradients through inference-mode BatchNorm (per-example gradients,
  # attribution) are rare and elementwise: XLA's own VJP suffices.
  _, vjp = jax.vjp(lambda *args: _activation_affine(*args, kernel_activation), *residuals)
  return vjp(g)


_kernel_apply.defvjp(_kernel_apply_fwd, _kernel_apply_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kernel_train(x, scale, bias, epsilon, kernel_activation):
  """(activation(BN(x)), batch mean, batch var) on the C++ kernels; x float32."""
  y, mean, var, _ = _kernel_forward(x, scale, bias, epsilon, kernel_activation)
  return y, mean, var


def _kernel_train_fwd(x, scale, bias, epsilon, kernel_activation):
  y, mean, var, inv_std = _kernel_forward(x, scale, bias, epsilon, kernel_activation)
  return (y, mean, var), (x, mean, inv_std, scale, bias)


def _kernel_train_bwd(epsilon, kernel_activation, residuals, cotangents):
  del epsilon
  return kernel_backward(*residuals, cotangents[0], kernel_activation)


def kernel_backward(x, mean, inv_std, scale, bias, dy, kernel_activation):
  """(dx, d_scale, d_bias) of training-mode activation(BN(x)) for the gradient `dy` at its output."""
  a, b = _coefficients(mean, inv_std, scale, bias)
  sums = kernel_backward_sums(x, dy, a, b, mean, kernel_activation)
  return kernel_backward_from_sums(x, mean, inv_std, scale, bias, dy, sums, kernel_activation)


def kernel_backward_sums(x, dy, a, b, mean, kernel_activation):
  """(sum of g, sum of g * (x - mean)) over the batch, g = dy * activation'(x * a + b): the
  gradient at the BatchNorm's output, from `dy` at the activation's."""
  channels = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
  return _kernel('backward_sums', (channels, channels), x, dy, a, b, mean,
                 **_kernel_attributes(kernel_activation))


def kernel_backward_from_sums(x, mean, inv_std, scale, bias, dy, sums, kernel_activation):
  """`kernel_backward` with its two per-channel sums over the batch given: (sum of g, sum of g *
  (x - mean)), g the gradient at the BatchNorm's output (a kernel that computed dy took them)."""
  count = x.size // x.shape[-1]
  a, b = _coefficients(mean, inv_std, scale, bias)
  sum_g, sum_gx = sums
  # dx = a * (g - sum_g / count - normalized * d_scale / count) = a * g + k1 * x + k0.
  k1 = -a * jnp.square(inv_std) * sum_gx / count
  k0 = -a * sum_g / count - k1 * mean
  dx = _kernel('backward_input', jax.ShapeDtypeStruct(x.shape, jnp.float32), x, dy, a, b, k1, k0,
               **_kernel_attributes(kernel_activation))
  return dx, sum_gx * inv_std, sum_g


_kernel_train.defvjp(_kernel_train_fwd, _kernel_train_bwd)


def inference_apply(x, a, b, activation: Callable, implementation: str = 'auto'):
  """activation(x * a + b) in float32: an inference-mode BatchNorm + activation, (a, b) from
  `inference_affine`; on the C++ kernel where `implementation` resolves to it."""
  x = x.astype(jnp.float32)
  if resolve_implementation(implementation, activation) == 'cpu_kernel':
    return _kernel_apply(x, a, b, KERNEL_ACTIVATIONS[activation])
  return activation(x * a + b)


def resolve_implementation(name: str, activation: Callable, backend: Optional[str] = None) -> str:
  """'auto' per ops/select.py, except that the C++ kernels compute ReLU, ReLU6, hard-swish and
  identity only."""
  choice = select.resolve('batch_norm', name, backend)
  if name == 'auto' and choice == 'cpu_kernel' and activation not in KERNEL_ACTIVATIONS:
    return 'xla'
  return choice


class BatchNormActivation(nn.Module):
  """activation(BatchNorm(x)) over the last axis, with Flax BatchNorm's names and semantics.

  Parameters `scale` (ones) and `bias` (zeros); batch statistics `mean`
  (zeros) and `var` (ones), updated as `momentum * old + (1 - momentum) * new`
  in training mode. Output in `dtype`.
  """
  use_running_average: bool = True
  momentum: float = 0.99
  epsilon: float = 1e-3
  activation: Optional[Callable] = nn.relu  # None: no activation.
  dtype: Any = jnp.float32
  implementation: str = 'auto'  # 'xla', 'cpu_kernel' (ReLU, ReLU6, hard-swish, none) or 'auto'.

  @nn.compact
  def __call__(self, x: jnp.ndarray, then: Optional[Any] = None) -> jnp.ndarray:
    """activation(BatchNorm(x)); with `then`, the depthwise layer it feeds
    (ops/norm_depthwise.DepthwiseAfter), then(activation(BatchNorm(x))), computed as one
    operation in training where `then.fuses` allows."""
    activation = self.activation or identity
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    on_kernel = resolve_implementation(self.implementation, activation) == 'cpu_kernel'
    if on_kernel and activation not in KERNEL_ACTIVATIONS:
      raise ValueError('the batch-norm CPU kernel computes ReLU, ReLU6, hard-swish and no '
                       f'activation only, not {activation}')
    if self.use_running_average:
      a, b = inference_affine({'scale': scale, 'bias': bias},
                              {'mean': running_mean.value, 'var': running_var.value}, self.epsilon)
      y = inference_apply(x, a, b, activation, self.implementation).astype(self.dtype)
      return y if then is None else then(y)
    fused = then is not None and on_kernel and then.fuses(x, activation)
    if fused:
      y, mean, var = then.fused_train(x, scale, bias, self.epsilon, activation)
    elif on_kernel:
      y, mean, var = _kernel_train(x.astype(jnp.float32), scale, bias, self.epsilon,
                                   KERNEL_ACTIVATIONS[activation])
      y = y.astype(self.dtype)
    else:
      y, mean, var = _xla_train(x, scale, bias, self.epsilon, activation, self.dtype)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y if then is None or fused else then(y)
