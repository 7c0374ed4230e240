"""Optimizer and schedules (optax): Adam with warmup and decay, clipping, the sparsity schedule."""
import jax
import jax.numpy as jnp
import ml_collections
import optax

DECAYS = ('linear', 'cosine', 'constant')


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, constant, then decay over the last part of training.

  Args:
    optim: the config's `optim` section.
    num_steps: total training steps.

  Returns:
    step -> learning rate.

  Raises:
    ValueError: unknown `optim.decay`.
  """
  if optim.decay not in DECAYS:
    raise ValueError(f'optim.decay={optim.decay!r} is unknown; expected one of {DECAYS}')
  peak = optim.learning_rate
  warmup = max(0, min(optim.warmup_steps, num_steps))
  pieces = [optax.linear_schedule(0.0, peak, warmup)] if warmup else []
  boundaries = [warmup] if warmup else []
  if optim.decay == 'constant':
    pieces.append(optax.constant_schedule(peak))
  else:
    decay_start = max(warmup, int(optim.decay_start_fraction * num_steps))
    decay_steps = max(1, num_steps - decay_start)
    final = peak * optim.final_lr_fraction
    pieces.append(optax.constant_schedule(peak))
    boundaries.append(decay_start)
    if optim.decay == 'linear':
      pieces.append(optax.linear_schedule(peak, final, decay_steps))
    else:
      pieces.append(optax.cosine_decay_schedule(peak, decay_steps,
                                                alpha=optim.final_lr_fraction))
  if len(pieces) == 1:
    return pieces[0]
  return optax.join_schedules(pieces, boundaries[:len(pieces) - 1])


def sparsity_schedule(sae: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The sparsity coefficient rises linearly from 0 over the warmup fraction, then holds."""
  warmup = int(sae.sparsity_warmup_fraction * num_steps)
  if warmup <= 0:
    return optax.constant_schedule(sae.sparsity_coefficient)
  return optax.linear_schedule(0.0, sae.sparsity_coefficient, warmup)


def scale_by_adam_stored_as(dtype, b1: float, b2: float,
                            eps: float) -> optax.GradientTransformation:
  """Adam's moment scaling with both moments stored in `dtype`.

  optax's own `mu_dtype` lowers only the first moment; for million-latent
  dictionaries the second moment is as large, so both are kept in `dtype` (for
  instance bfloat16), with the arithmetic in float32. The update is computed
  from the moments as stored (rounded to `dtype`), so that each moment is one
  elementwise pass that XLA runs in place in the donated state, and the update
  fuses into the parameter update: no float32 copy of a moment or of the
  update ever exists (optax's adam keeps three).
  """
  dtype = jnp.dtype(dtype)

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, dtype)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(zeros, params),
                                  nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    f32 = lambda t: t.astype(jnp.float32)
    mu = jax.tree.map(lambda m, g: (b1 * f32(m) + (1 - b1) * f32(g)).astype(dtype),
                      state.mu, updates)
    nu = jax.tree.map(lambda v, g: (b2 * f32(v) + (1 - b2) * jnp.square(f32(g))).astype(dtype),
                      state.nu, updates)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    updates = jax.tree.map(
        lambda m, v, g: ((f32(m) / c1) / (jnp.sqrt(f32(v) / c2) + eps)).astype(g.dtype),
        mu, nu, updates)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def make_optimizer(optim: ml_collections.ConfigDict,
                   num_steps: int) -> optax.GradientTransformation:
  """Clip by global norm (optional), then Adam with the learning-rate schedule."""
  schedule = learning_rate_schedule(optim, num_steps)
  if jnp.dtype(optim.state_dtype) == jnp.float32:
    adam = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  else:
    adam = optax.chain(scale_by_adam_stored_as(optim.state_dtype, optim.b1, optim.b2, optim.eps),
                       optax.scale_by_learning_rate(schedule))
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adam)
  return adam
