"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope,
Lieberum et al. 2024).

    z = x @ W_enc + b_enc        f = z * H(z - theta),  theta = exp(log_threshold)
    x_hat = f @ W_dec + b_dec
    loss = mse + lambda * L0,    L0 = mean_b sum_i H(z_i - theta_i)

H has no useful derivative, so straight-through estimators give theta a
gradient through a rectangle-kernel pseudo-derivative of bandwidth eps
(`jumprelu_bandwidth`), K(u) = 1{|u| < 1/2}:

    d/dtheta [z H(z - theta)] = -(theta / eps) K((z - theta) / eps)
    d/dtheta H(z - theta)     = -(1 / eps) K((z - theta) / eps)

and z gets H(z - theta) from the first term and nothing through H itself.

As in Gemma Scope, decoder rows are kept at unit norm (gradient projected,
rows renormalised after each update; the L0 penalty is blind to decoder scale),
W_enc starts as W_dec^T, b_enc at 0 and theta at `jumprelu_threshold_init`.
Gemma Scope normalises activations to E||x||^2 = 1; with this library's
E||x||^2 = d_model, pre-activations are sqrt(d_model) larger and mse d_model
times larger, so their (theta_init, eps, lambda) map to
(sqrt(d) theta_init, sqrt(d) eps, d lambda).

Two limits of this recipe matter for short runs. Under Adam, log_threshold
moves by at most about the learning rate per step, so theta can change by at
most a factor exp(lr * steps): Gemma Scope's small theta_init suits runs of
10^5 steps, while a run of a few thousand needs theta_init near where the
thresholds end up (about the pre-activation scale, ~1 here with unit decoder
rows). And nothing revives a latent whose pre-activations stay below
theta - eps / 2, since no gradient reaches it; on the synthetic ground truth
about 60% of the latents die that way (tests/test_ground_truth.py).

With `sparse_capacity` C > 0, the entries with z > theta - eps (the active ones
and those inside the kernel band, i.e. every entry with a non-zero gradient)
are followed sparsely as flat triples, C slots per token on average
(`sparse.select_positive`); a batch with more is computed densely
(`lax.cond`), so loss and gradients are always exact.
"""
import functools

import jax
import jax.numpy as jnp

from dictlearn.sae import base
from dictlearn.sae import sparse


def _rectangle(u):
  return ((u > -0.5) & (u < 0.5)).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, theta, bandwidth):
  """z * H(z - theta) with the JumpReLU pseudo-derivative wrt theta.

  Args:
    z: pre-activations.
    theta: thresholds, same shape as z (broadcast before calling).
    bandwidth: kernel width eps (static float).

  Returns:
    Activations, same shape as z.
  """
  return jnp.where(z > theta, z, 0.0)


def _jumprelu_fwd(z, theta, bandwidth):
  return jumprelu(z, theta, bandwidth), (z, theta)


def _jumprelu_bwd(bandwidth, res, g):
  z, theta = res
  d_z = jnp.where(z > theta, g, 0.0)
  d_theta = -(theta / bandwidth) * _rectangle((z - theta) / bandwidth) * g
  return d_z, d_theta


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z, theta, bandwidth):
  """H(z - theta) as float32, with the pseudo-derivative -(1/eps) K wrt theta only."""
  return (z > theta).astype(jnp.float32)


def _step_fwd(z, theta, bandwidth):
  return step(z, theta, bandwidth), (z, theta)


def _step_bwd(bandwidth, res, g):
  z, theta = res
  return jnp.zeros_like(z), -(1.0 / bandwidth) * _rectangle((z - theta) / bandwidth) * g


step.defvjp(_step_fwd, _step_bwd)


class JumpReLUSAE(base.CapacitySAE):
  """JumpReLU SAE trained on an L0 penalty with straight-through estimators."""
  name = 'jumprelu'
  unit_norm_decoder = True

  def __init__(self, cfg, d_model, tuning=sparse.DEFAULT_TUNING):
    super().__init__(cfg, d_model, tuning)
    self._check_capacity()
    if cfg.jumprelu_threshold_init <= 0:
      raise ValueError('sae.jumprelu_threshold_init must be positive, got '
                       f'{cfg.jumprelu_threshold_init}')
    if cfg.jumprelu_bandwidth <= 0:
      raise ValueError(f'sae.jumprelu_bandwidth must be positive, got {cfg.jumprelu_bandwidth}')
    self.bandwidth = float(cfg.jumprelu_bandwidth)

  def init(self, key):
    params = self._tied_init(key, 1.0)
    log_theta = jnp.log(jnp.float32(self.cfg.jumprelu_threshold_init))
    params['log_threshold'] = jnp.full((self.n_latents,), log_theta, self.param_dtype)
    return params, {}

  def logical_axes(self):
    params, buffers = super().logical_axes()
    return dict(params, log_threshold=('latent',)), buffers

  @staticmethod
  def threshold(params):
    """theta = exp(log_threshold), [n] float32."""
    return jnp.exp(params['log_threshold'].astype(jnp.float32))

  def _output(self, params, x, x_hat, l0, fired, coefficient):
    mse, fvu = base.reconstruction_metrics(x, x_hat)
    metrics = {
        'mse': mse, 'fvu': fvu, 'l0': l0, 'l0_penalty': l0,
        'threshold_mean': jnp.mean(self.threshold(params)),
    }
    return base.ForwardOutput(mse + coefficient * l0, metrics, fired, {})

  def _dense_loss(self, params, x, coefficient, dead_mask):
    """The loss by the dense formulation."""
    del dead_mask
    pre = self._preacts(params, x)
    theta = jnp.broadcast_to(self.threshold(params), pre.shape)
    acts = jumprelu(pre, theta, self.bandwidth)
    x_hat = self.decode(params, acts)
    l0 = jnp.sum(step(pre, theta, self.bandwidth)) / x.shape[0]
    fired = jnp.sum((pre > theta).astype(jnp.float32), axis=0)
    return self._output(params, x, x_hat, l0, fired, coefficient)

  def _sparse_loss(self, params, x, selection, coefficient, dead_mask):
    """The loss from the selected entries (when the selection holds them all)."""
    del dead_mask
    values = sparse.with_encoder_vjp(selection, x, params['W_enc'], params['b_enc'], self.tuning)
    latents = selection.latents
    theta = self.threshold(params)[latents]
    acts = jumprelu(values, theta, self.bandwidth)
    x_hat = self._sparse_decode(params, acts, latents, selection.tokens)
    l0 = jnp.sum(step(values, theta, self.bandwidth)) / x.shape[0]
    fired = jax.ops.segment_sum((values > theta).astype(jnp.float32).reshape(-1),
                                latents.reshape(-1), num_segments=self.n_latents)
    return self._output(params, x, x_hat, l0, fired, coefficient)

  def _selection_threshold(self, params):
    # Entries with (z - theta) + eps > 0: every one that is active or inside the
    # kernel band (|z - theta| < eps / 2), i.e. every entry with a non-zero
    # gradient, computed with the same float ops as the band test.
    return self.threshold(params), self.bandwidth

  def _inference_act(self, params):
    theta = self.threshold(params)
    return lambda pre: jnp.where(pre > theta, pre, 0.0)

  def encode(self, params, buffers, x):
    return self._inference_act(params)(self._preacts(params, x.astype(jnp.float32)))

  def reconstruct(self, params, buffers, x):
    return self._threshold_reconstruct(params, x.astype(jnp.float32), self.threshold(params),
                                       self._inference_act(params))
