"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates -
April 2024", training SAEs).

    f = ReLU(x @ W_enc + b_enc)          x_hat = f @ W_dec + b_dec
    loss = mse + lambda * l1,            l1 = mean_b sum_i f_i ||W_dec[i]||_2

`mse` is summed over d_model and averaged over the batch; lambda is the
scheduled `sparsity_coefficient` the trainer passes in (warmed up from 0). The
decoder is unconstrained: its rows start as random directions of norm
`decoder_init_norm` and the penalty's norm factor keeps the scale honest.
W_enc starts as W_dec^T, biases at 0. The recipe assumes activations scaled so
that E||x||^2 = d_model (the data layer's `normalize`).

With `sparse_capacity` C > 0, the non-zeros are followed sparsely through the
decoder, the penalty and every backward pass, as flat (token, latent) triples
with C slots per token on average (`sparse.select_positive`: tokens pool
their slots in groups); a batch that has more non-zeros than a group's slots is
computed with the dense formulation instead (`lax.cond`), so loss and
gradients are always exact.
"""
import jax
import jax.numpy as jnp

from dictlearn.sae import base
from dictlearn.sae import sparse


def _row_norms(w_dec):
  return jnp.linalg.norm(w_dec.astype(jnp.float32), axis=-1)


class ReluL1SAE(base.CapacitySAE):
  """ReLU SAE with the L1 penalty sum_i f_i ||W_dec[i]|| (no decoder constraint)."""
  name = 'relu_l1'
  unit_norm_decoder = False

  def __init__(self, cfg, d_model, tuning=sparse.DEFAULT_TUNING):
    super().__init__(cfg, d_model, tuning)
    self._check_capacity()
    if cfg.decoder_init_norm <= 0:
      raise ValueError(f'sae.decoder_init_norm must be positive, got {cfg.decoder_init_norm}')

  def init(self, key):
    return self._tied_init(key, self.cfg.decoder_init_norm), {}

  def _output(self, x, x_hat, l1, fired, coefficient):
    mse, fvu = base.reconstruction_metrics(x, x_hat)
    metrics = {'mse': mse, 'fvu': fvu, 'l1': l1, 'l0': jnp.sum(fired) / x.shape[0]}
    return base.ForwardOutput(mse + coefficient * l1, metrics, fired, {})

  def _dense_loss(self, params, x, coefficient, dead_mask):
    """The loss by the dense formulation."""
    del dead_mask
    acts = jax.nn.relu(self._preacts(params, x))
    x_hat = self.decode(params, acts)
    # Sums over the batch as products (`sparse.batch_sum`), in both directions.
    l1 = jnp.dot(sparse.batch_sum(acts), _row_norms(params['W_dec'])) / x.shape[0]
    fired = sparse.batch_sum((acts > 0).astype(jnp.float32))
    return self._output(x, x_hat, l1, fired, coefficient)

  def _sparse_loss(self, params, x, selection, coefficient, dead_mask):
    """The loss from the selected non-zeros (when the selection holds them all)."""
    del dead_mask
    values = sparse.with_encoder_vjp(selection, x, params['W_enc'], params['b_enc'], self.tuning)
    acts = jax.nn.relu(values)
    latents = selection.latents
    x_hat = self._sparse_decode(params, acts, latents, selection.tokens)
    l1 = jnp.sum(acts * _row_norms(params['W_dec'])[latents]) / x.shape[0]
    fired = sparse.count_fired(acts, latents, self.n_latents)
    return self._output(x, x_hat, l1, fired, coefficient)

  def _selection_threshold(self, params):
    return None, 0.0  # the non-zeros

  def encode(self, params, buffers, x):
    return jax.nn.relu(self._preacts(params, x.astype(jnp.float32)))

  def reconstruct(self, params, buffers, x):
    return self._threshold_reconstruct(params, x.astype(jnp.float32),
                                       jnp.zeros((self.n_latents,), jnp.float32),
                                       jax.nn.relu)
