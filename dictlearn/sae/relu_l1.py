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

With `sparse_capacity` C > 0, each token's non-zeros (up to C) are followed
sparsely through the decoder, the penalty and every backward pass; a batch in
which some token has more than C non-zeros is computed with the dense
formulation instead (`lax.cond`), so loss and gradients are always exact.
"""
import jax
from jax import lax
import jax.numpy as jnp

from dictlearn.sae import base
from dictlearn.sae import kernels


def _row_norms(w_dec):
  return jnp.linalg.norm(w_dec.astype(jnp.float32), axis=-1)


class ReluL1SAE(base.SparseAutoencoder):
  """ReLU SAE with the L1 penalty sum_i f_i ||W_dec[i]|| (no decoder constraint)."""
  name = 'relu_l1'
  unit_norm_decoder = False

  def __init__(self, cfg, d_model):
    super().__init__(cfg, d_model)
    self._check_capacity()
    if cfg.decoder_init_norm <= 0:
      raise ValueError(f'sae.decoder_init_norm must be positive, got {cfg.decoder_init_norm}')

  def init(self, key):
    return self._tied_init(key, self.cfg.decoder_init_norm), {}

  def _dense_parts(self, operands):
    """(x_hat, l1, fired, active) by the dense formulation."""
    x, params = operands[:2]
    acts = jax.nn.relu(self._preacts(params, x))
    x_hat = self.decode(params, acts)
    l1 = jnp.sum(acts * _row_norms(params['W_dec'])) / x.shape[0]
    active = (acts > 0).astype(jnp.float32)
    return x_hat, l1, jnp.sum(active, axis=0), jnp.sum(active)

  def _sparse_parts(self, operands):
    """(x_hat, l1, fired, active) from the per-token non-zeros (no overflow)."""
    x, params, values, latents = operands
    acts = jax.nn.relu(values)
    x_hat = (kernels.sparse_decode(acts, latents, params['W_dec'])
             + params['b_dec'].astype(jnp.float32))
    l1 = jnp.sum(acts * _row_norms(params['W_dec'])[latents]) / x.shape[0]
    fired = kernels.count_fired(acts, latents, self.n_latents)
    return x_hat, l1, fired, jnp.sum(fired)

  def forward(self, params, buffers, x, *, sparsity_coefficient, dead_mask):
    del dead_mask
    x = x.astype(jnp.float32)
    capacity = self.cfg.sparse_capacity
    if not capacity:
      x_hat, l1, fired, active = self._dense_parts((x, params))
    else:
      values, latents, overflow = kernels.capacity_select(
          x, params['W_enc'], params['b_enc'], capacity, block_size=self.block_size,
          dtype=jnp.dtype(self.dtype).name)
      # The dense branch is rematerialised so that it saves no [B, n] residual
      # that the (usual) sparse branch would have to carry as zeros.
      x_hat, l1, fired, active = lax.cond(
          overflow, jax.checkpoint(self._dense_parts), self._sparse_parts,
          (x, params, values, latents))
    mse, fvu = base.reconstruction_metrics(x, x_hat)
    loss = mse + sparsity_coefficient * l1
    metrics = {
        'mse': mse, 'fvu': fvu, 'l1': l1, 'l0': active / x.shape[0],
    }
    if capacity:  # 1 when this batch fell back to the dense formulation
      metrics['overflow'] = overflow.astype(jnp.float32)
    return base.ForwardOutput(loss, metrics, fired, buffers)

  def encode(self, params, buffers, x):
    return jax.nn.relu(self._preacts(params, x.astype(jnp.float32)))

  def reconstruct(self, params, buffers, x):
    return self._threshold_reconstruct(params, x.astype(jnp.float32),
                                       jnp.zeros((self.n_latents,), jnp.float32),
                                       jax.nn.relu)
