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
about 2/3 of the latents die that way (experiments/synthetic.py).

Two recipes (`sae.jumprelu_recipe`):

* 'gemma_scope': the published recipe above, nothing more.
* 'gemma_scope_auxk': the same loss plus Gao et al.'s AuxK on the dead latents
  (a latent unfired for `dead_tokens_threshold` tokens), exactly as TopK uses it
  (`topk.aux_k_term`): the top `aux_k` pre-activations among the dead latents,
  through a ReLU, reconstruct the residual x - x_hat (held fixed), scaled by
  min(n_dead / aux_k, 1) and weighted by `aux_k_coefficient`. It gives dead
  latents a gradient towards what the live ones miss, which the L0 penalty's
  pseudo-derivative never does. On the synthetic ground truth it is what
  lifts the recovered fraction above 0.9 (tests/test_ground_truth.py): 0.645
  without it at 8000 steps, 0.930 with it at aux_k 64 and 8000 steps, and
  0.97-0.98 at aux_k 16 (the synthetic recipe's) and 6000 steps.

With `sparse_capacity` C > 0, the entries with z > theta - eps (the active ones
and those inside the kernel band, i.e. every entry with a non-zero gradient)
are followed sparsely as flat triples, C slots per token on average
(`sparse.select_positive`); a batch with more is computed densely
(`lax.cond`), so loss and gradients are always exact. With AuxK the sparse path
also needs the dead latents' pre-activations: it computes them densely over the
gathered dead latents when at most `topk.aux_dense_cap` are dead, and a batch
with more dead latents runs the dense formulation.
"""
import functools

import jax
from jax import lax
import jax.numpy as jnp

from dictlearn.sae import base
from dictlearn.sae import sparse
from dictlearn.sae import topk

# sae.jumprelu_recipe -> whether the loss adds AuxK on the dead latents.
RECIPES = {'gemma_scope': False, 'gemma_scope_auxk': True}


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
    # Configs written before the recipes existed ran the published one.
    recipe = cfg.get('jumprelu_recipe', 'gemma_scope')
    if recipe not in RECIPES:
      raise ValueError(f'sae.jumprelu_recipe={recipe!r} is not one of {sorted(RECIPES)}')
    self.with_aux_k = RECIPES[recipe]
    if self.with_aux_k:
      if not 0 < cfg.aux_k <= self.n_latents:
        raise ValueError(f"sae.aux_k={cfg.aux_k} must be in [1, n_latents={self.n_latents}] "
                         "for sae.jumprelu_recipe='gemma_scope_auxk'")
      if cfg.aux_k_coefficient < 0:
        raise ValueError(f'sae.aux_k_coefficient must be >= 0, got {cfg.aux_k_coefficient}')

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

  def _output(self, params, x, x_hat, l0, fired, coefficient, aux_e_hat, dead_mask):
    """The ForwardOutput; aux_e_hat is AuxK's reconstruction of the residual, or None."""
    mse, fvu = base.reconstruction_metrics(x, x_hat)
    metrics = {
        'mse': mse, 'fvu': fvu, 'l0': l0, 'l0_penalty': l0,
        'threshold_mean': jnp.mean(self.threshold(params)),
    }
    loss = mse + coefficient * l0
    if self._with_aux(dead_mask):
      n_dead = jnp.sum(dead_mask.astype(jnp.float32))
      # No e_hat: the sparse path with no dense AuxK (nothing dead there, else
      # `_dense_required` sent the batch to the dense path).
      aux = (jnp.zeros((), jnp.float32) if aux_e_hat is None
             else topk.aux_k_loss(self, aux_e_hat, x - x_hat, n_dead))
      metrics.update(aux_k=aux, n_dead=n_dead)
      loss = loss + self.cfg.aux_k_coefficient * aux
    return base.ForwardOutput(loss, metrics, fired, {})

  def _with_aux(self, dead_mask):
    return self.with_aux_k and dead_mask is not None

  def _dense_loss(self, params, x, coefficient, dead_mask):
    """The loss by the dense formulation (AuxK over every dead latent)."""
    pre = self._preacts(params, x)
    # Its gradient sums over the batch as a product (`sparse.broadcast_rows`).
    theta = sparse.broadcast_rows(self.threshold(params), x.shape[0])
    acts = jumprelu(pre, theta, self.bandwidth)
    x_hat = self.decode(params, acts)
    l0 = jnp.sum(step(pre, theta, self.bandwidth)) / x.shape[0]
    fired = sparse.batch_sum((pre > theta).astype(jnp.float32))
    e_hat = None
    if self._with_aux(dead_mask):
      # The top aux_k dead pre-activations of each token (live latents masked;
      # with fewer dead than aux_k the extra picks are live, masked to 0).
      _, pos = sparse.top_k_rows(lax.stop_gradient(jnp.where(dead_mask, pre, -jnp.inf)),
                                 self.cfg.aux_k, self.tuning)
      values = jnp.take_along_axis(pre, pos, axis=1)
      aux_acts = jnp.where(dead_mask[pos], jax.nn.relu(values), 0.0)
      e_hat = sparse.sparse_decode(aux_acts, pos, params['W_dec'], tuning=self.tuning)
    return self._output(params, x, x_hat, l0, fired, coefficient, e_hat, dead_mask)

  def _sparse_loss(self, params, x, selection, coefficient, dead_mask):
    """The loss from the selected entries (when the selection holds them all, and
    with AuxK at most `topk.aux_dense_cap` latents are dead)."""
    values = sparse.with_encoder_vjp(selection, x, params['W_enc'], params['b_enc'], self.tuning)
    latents = selection.latents
    theta = self.threshold(params)[latents]
    acts = jumprelu(values, theta, self.bandwidth)
    x_hat = self._sparse_decode(params, acts, latents, selection.tokens)
    l0 = jnp.sum(step(values, theta, self.bandwidth)) / x.shape[0]
    fired = jax.ops.segment_sum((values > theta).astype(jnp.float32).reshape(-1),
                                latents.reshape(-1), num_segments=self.n_latents)
    e_hat = None
    if self._with_aux(dead_mask) and topk.aux_dense_cap(self):
      e_hat = topk.aux_reconstruction_dense(self, params, x, dead_mask, topk.aux_dense_cap(self))
    return self._output(params, x, x_hat, l0, fired, coefficient, e_hat, dead_mask)

  def _dense_required(self, dead_mask):
    if not self._with_aux(dead_mask):
      return None
    return jnp.sum(dead_mask.astype(jnp.int32)) > topk.aux_dense_cap(self)

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
