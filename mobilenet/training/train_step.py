"""The training state and the pure, jit-able train and eval steps.

Nothing here knows about files, flags or devices: `train.py` wraps these
functions in `jax.jit` over a device mesh.
"""
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (which is `step`)."""
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  # The exponential moving average of the model's variables, {'params': ...,
  # 'batch_stats': ...}, or None when config.ema_decay is 0; evaluation with EMA
  # uses both, as TF-slim and timm do. (One field, under the name it always had, so
  # that checkpoints of runs without EMA from before it covered the statistics
  # keep the structure they were saved with.)
  ema_params: Any


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> TrainState:
  """Initializes parameters from config.seed (deterministic on any device count)."""
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
      ema_params=({'params': params, 'batch_stats': variables.get('batch_stats', {})}
                  if config.ema_decay > 0 else None))


# XLA options for programs that run once (the initialization): on the CPU its
# optimization passes and LLVM's cost more compile time than they could ever
# save at run time (docs/performance.md, "Start-up"). The values agree with the
# optimized program's to an ulp or two, and are the same on every run.
_RUN_ONCE_COMPILER_OPTIONS = {'cpu': {'xla_backend_optimization_level': 0}}


def run_once(jitted: Callable[[], Any]) -> Any:
  """Compiles `jitted` (a `jax.jit` of no arguments) for compile time, not speed, and runs it."""
  options = _RUN_ONCE_COMPILER_OPTIONS.get(jax.default_backend(), {})
  return jitted.lower().compile(compiler_options=options)()


def ema_decay_at(step: jnp.ndarray, decay: float) -> jnp.ndarray:
  """The decay of the average's update after `step` steps: min(decay, (1 + step) / (10 + step)).

  TensorFlow's ExponentialMovingAverage with num_updates (TF-slim's recipe):
  early on the average follows the weights closely instead of staying near
  the random initialization for ~1 / (1 - decay) steps.
  """
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, num_classes: int,
                  label_smoothing: float) -> jnp.ndarray:
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing > 0:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


# A cross-entropy this many times that of guessing uniformly (log(num_classes)) means logits
# hundreds apart: the run has diverged even where float32 still holds the numbers.
DIVERGED_LOSS_FACTOR = 100.0
# `nonfinite` codes of a step, and what each means (0: the step is good).
DIVERGENCE_REASONS = {
    1: 'the loss is NaN or infinite',
    2: f'the loss exceeds {DIVERGED_LOSS_FACTOR:g} x log(num_classes)',
    3: 'the gradients are NaN or infinite',
    4: 'the updated weights or optimizer state are NaN or infinite',
    5: 'the updated BatchNorm statistics are NaN or infinite',
}


# Leaves of up to this many elements are checked together, as one vector: XLA:CPU runs each
# reduction as an operation of its own, and V3-Small's step spent more on dispatching its ~1,000
# per-leaf checks (BatchNorm scales and biases, their optimizer state) than on their arithmetic.
# Larger leaves are checked where they lie: copying them into the vector would cost more.
_SMALL_LEAF = 1 << 16


def _check_groups(tree) -> list[jnp.ndarray]:
  """The tree's leaves as few arrays: the small ones concatenated, the large ones as they are."""
  leaves = jax.tree.leaves(tree)
  small = [jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves if leaf.size <= _SMALL_LEAF]
  large = [leaf for leaf in leaves if leaf.size > _SMALL_LEAF]
  return ([jnp.concatenate(small)] if small else []) + large


def _all_finite(tree) -> jnp.ndarray:
  checks = [jnp.all(jnp.isfinite(group)) for group in _check_groups(tree)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _squared_norm(tree) -> jnp.ndarray:
  """optax.tree.norm(tree) ** 2, in as few operations as _all_finite."""
  return sum((jnp.sum(jnp.square(group.astype(jnp.float32))) for group in _check_groups(tree)),
             jnp.float32(0))


def divergence(loss: jnp.ndarray, grads, new_state: 'TrainState', num_classes: int) -> jnp.ndarray:
  """0 when a step may be kept, else the first code of DIVERGENCE_REASONS that applies.

  The loss alone is not enough: BatchNorm's running statistics only enter the
  eval loss, and a loss in the 1e16s is finite.
  """
  checks = [~jnp.isfinite(loss), loss > DIVERGED_LOSS_FACTOR * np.log(num_classes),
            ~jnp.isfinite(_squared_norm(grads)),  # Not only NaN: a norm past float32's range.
            ~_all_finite((new_state.params, new_state.opt_state, new_state.ema_params)),
            ~_all_finite(new_state.batch_stats)]
  code = jnp.int32(0)
  for index, failed in reversed(list(enumerate(checks, 1))):
    code = jnp.where(failed, index, code)
  return code


def train_step(state: TrainState, batch: dict[str, jnp.ndarray], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One SGD step on a global batch; BatchNorm statistics are over the whole global batch.

  A step that diverges (see `divergence`) leaves the state as it was and
  reports the reason's code as `nonfinite`, so the loop can stop with the last
  good state.
  """
  dropout_rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1), state.step)

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss = cross_entropy(logits, batch['label'], config.model.num_classes,
                         config.label_smoothing).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    keep = ema_decay_at(state.step, config.ema_decay)
    ema = optax.incremental_update({'params': params, 'batch_stats': batch_stats}, ema,
                                   1.0 - keep)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state, ema_params=ema)
  problem = divergence(loss, grads, new_state, config.model.num_classes)
  # Keep the old state (but count the step) when this one went non-finite.
  new_state = jax.tree.map(lambda new, old: jnp.where(problem == 0, new, old), new_state,
                           state.replace(step=state.step + 1))
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'learning_rate': schedule(state.step),
      'nonfinite': problem,
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jnp.ndarray], *, apply_fn: Callable,
              config: ml_collections.ConfigDict, use_ema: bool) -> dict[str, jnp.ndarray]:
  """Sums of loss, top-1 and top-5 hits and example count over the masked (real) examples.

  `apply_fn(variables, images)` computes inference-mode logits: the model's own
  apply, or an equal transformation of it (models/fused_inference.eval_apply).
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if use_ema and state.ema_params is not None:  # The averaged weights with their own statistics.
    variables = state.ema_params
  logits = apply_fn(variables, batch['image'])
  mask = batch['mask'].astype(jnp.float32)
  labels = batch['label']
  loss = cross_entropy(logits, labels, config.model.num_classes, 0.0)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return {
      'loss_sum': jnp.sum(loss * mask),
      'top1_hits': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
      'top5_hits': jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
      'count': jnp.sum(mask),
  }
