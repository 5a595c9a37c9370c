"""Optimizer, learning-rate schedule and weight-decay mask, all from the config."""
import ml_collections
import optax
from flax import traverse_util


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """Linear warmup, then constant, cosine to zero, or TF-slim's staircase exponential decay."""
  peak = config.optimizer.learning_rate
  warmup_steps = int(config.schedule.warmup_epochs * steps_per_epoch)
  name = config.schedule.name
  if name == 'cosine':
    after = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1))
  elif name == 'exponential':
    after = optax.exponential_decay(
        peak, transition_steps=max(int(config.schedule.decay_epochs * steps_per_epoch), 1),
        decay_rate=config.schedule.decay_rate, staircase=True)
  else:
    after = optax.constant_schedule(peak)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def weight_decay_mask(params, decay_depthwise: bool):
  """True for the kernels that decay: convolutions and the classifier.

  BatchNorm scales and offsets and biases never decay; depthwise kernels only
  when asked (the paper: "very little or no weight decay" on depthwise filters,
  which have so few parameters).
  """
  flat = traverse_util.flatten_dict(params)
  mask = {}
  for path in flat:
    is_kernel = path[-1] == 'kernel'
    is_depthwise = len(path) >= 2 and path[-2] == 'depthwise'
    mask[path] = is_kernel and (decay_depthwise or not is_depthwise)
  return traverse_util.unflatten_dict(mask)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD (momentum / Nesterov), RMSprop (the paper, with TF's conventions) or AdamW."""
  opt = config.optimizer
  mask = lambda params: weight_decay_mask(params, opt.decay_depthwise)
  chain = []
  if opt.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name == 'adamw':
    chain.append(optax.adamw(schedule, b1=opt.adam_b1, b2=opt.adam_b2,
                             weight_decay=opt.weight_decay, mask=mask))
    return optax.chain(*chain)
  if opt.weight_decay > 0:  # Coupled L2, as TF-slim's regularizer adds it to the loss.
    chain.append(optax.add_decayed_weights(opt.weight_decay, mask))
  if opt.name == 'sgd':
    chain.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  else:
    # TensorFlow's RMSProp: epsilon inside the square root, mean square starting at 1,
    # and the learning rate inside the momentum (optax scales before its trace, as
    # TF does), which matters once the rate changes. tests/test_recipe.py compares.
    chain.append(optax.rmsprop(schedule, decay=opt.rmsprop_decay, eps=opt.rmsprop_epsilon,
                               initial_scale=1.0, eps_in_sqrt=True,
                               momentum=opt.momentum or None))
  return optax.chain(*chain)

