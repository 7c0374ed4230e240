"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * B largest ReLU'd pre-activations across the whole batch
instead of k per token, so the number of active latents varies per token:

    pre = (x - b_dec) @ W_enc + b_enc
    z = BatchTopK_{k * B}(ReLU(pre))             x_hat = z @ W_dec + b_dec
    loss = mse + aux_k_coefficient * aux_k       (AuxK exactly as TopK)

For inference the batch dependence is replaced by a global threshold theta:
z = pre * 1[pre > theta]. theta (buffers['threshold']) is an EMA with momentum
`batchtopk_threshold_momentum` of the smallest positive kept activation of each
training batch; the first batch sets it directly.

The kept entries are exactly k * B (token, latent, value) triples; decoding and
every backward pass follow only those. With `sparse_capacity` C > 0 (C >= k) the
selection first takes each token's top C candidates and then the global top
k * B among those, which is exact unless a token needs more than C (then, for
that batch, the selection runs over the whole [B, n] matrix). With C = 0 the
selection always runs over the whole matrix: exact and much slower.
"""
import jax
from jax import lax
import jax.numpy as jnp

from dictlearn.sae import base
from dictlearn.sae import kernels
from dictlearn.sae import topk


class BatchTopKSAE(topk.TopKSAE):
  """BatchTopK SAE with AuxK, unit-norm decoder rows and a learned inference threshold."""
  name = 'batchtopk'

  def __init__(self, cfg, d_model):
    super().__init__(cfg, d_model)
    capacity = cfg.sparse_capacity
    if capacity and not cfg.k <= capacity <= self.n_latents:
      raise ValueError(f'sae.sparse_capacity={capacity} (batchtopk: candidates per token) '
                       f'must be 0 or in [k={cfg.k}, n_latents={self.n_latents}]')
    if self.block_size and not capacity:
      raise ValueError('batchtopk with sae.encoder_block_size > 0 needs '
                       'sae.sparse_capacity > 0 (per-token candidates)')
    kernels.check_block_size(self.n_latents, self.block_size,
                             max(capacity, cfg.aux_k, cfg.k))
    if not 0.0 <= cfg.batchtopk_threshold_momentum < 1.0:
      raise ValueError('sae.batchtopk_threshold_momentum must be in [0, 1), got '
                       f'{cfg.batchtopk_threshold_momentum}')

  def init(self, key):
    params, _ = super().init(key)
    return params, {'threshold': jnp.zeros((), jnp.float32)}

  def logical_axes(self):
    params, _ = super().logical_axes()
    return params, {'threshold': ()}

  def _update_threshold(self, threshold, acts):
    """EMA of the smallest positive kept activation; unchanged if none is positive."""
    smallest = jnp.min(jnp.where(acts > 0, acts, jnp.inf))
    m = self.cfg.batchtopk_threshold_momentum
    ema = jnp.where(threshold > 0, m * threshold + (1.0 - m) * smallest, smallest)
    return lax.stop_gradient(jnp.where(jnp.isfinite(smallest), ema, threshold))

  def forward(self, params, buffers, x, *, sparsity_coefficient, dead_mask):
    del sparsity_coefficient
    x = x.astype(jnp.float32)
    if dead_mask is None:
      dead_mask = jnp.zeros((self.n_latents,), bool)
    x_in, enc = self._encode_sparse(params, x, dead_mask, k=self.cfg.sparse_capacity,
                                    batch_k_per_token=self.cfg.k)
    acts = jax.nn.relu(enc.values)
    x_hat = (kernels.sparse_decode(acts, enc.latents, params['W_dec'], tokens=enc.tokens)
             + params['b_dec'].astype(jnp.float32))
    mse, fvu = base.reconstruction_metrics(x, x_hat)
    aux, n_dead = topk.aux_k_loss(self, params, enc, x_in, x - x_hat, dead_mask)
    loss = mse + self.cfg.aux_k_coefficient * aux
    threshold = self._update_threshold(buffers['threshold'], acts)
    metrics = {
        'mse': mse, 'fvu': fvu, 'aux_k': aux, 'n_dead': n_dead,
        'l0': jnp.sum((acts > 0).astype(jnp.float32)) / x.shape[0],
        'threshold': threshold,
        'overflow': enc.overflow.astype(jnp.float32),
    }
    fired = kernels.count_fired(acts, enc.latents, self.n_latents)
    return base.ForwardOutput(loss, metrics, fired, {'threshold': threshold})

  def _inference_act(self, buffers):
    # ReLU then the threshold: keeps pre > max(theta, 0).
    theta = jnp.maximum(buffers['threshold'].astype(jnp.float32), 0.0)
    return lambda pre: jnp.where(pre > theta, pre, 0.0)

  def encode(self, params, buffers, x):
    x_in = x.astype(jnp.float32) - params['b_dec'].astype(jnp.float32)
    return self._inference_act(buffers)(self._preacts(params, x_in))

  def reconstruct(self, params, buffers, x):
    x_in = x.astype(jnp.float32) - params['b_dec'].astype(jnp.float32)
    theta = jnp.maximum(buffers['threshold'].astype(jnp.float32), 0.0)
    threshold = jnp.full((self.n_latents,), theta)
    return self._threshold_reconstruct(params, x_in, threshold, self._inference_act(buffers))
