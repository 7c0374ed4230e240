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
every backward pass follow only those. The selection is exact on every path:

* floor path (usual): every entry above a floor (buffers['selection_floor'],
  set from the previous batch near rank 2 * k * B) is collected by the flat
  capacity selection (`sparse.select_positive`, C slots per token on
  average) and the global top k * B is taken among them. No per-token top-k.
* per-token candidates (the first batch, and any batch where the floor path
  would not be exact): each token's top C candidates, then the global top
  k * B among those; exact unless a token needs more than C, and then, for
  that batch, the selection runs over the whole [B, n] matrix.

With `sparse_capacity` C = 0 the selection always runs over the whole matrix:
exact and much slower. The metrics `selection_fallback` and `overflow` say
when a batch took the second path and the whole-matrix search.
"""
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from dictlearn.sae import base
from dictlearn.sae import sparse
from dictlearn.sae import topk


class Path(NamedTuple):
  """What either selection path hands to the rest of the loss.

  Attributes:
    reconstruction: topk.Reconstruction of the kept triples.
    overflow: bool scalar, the per-token candidates could not hold the batch
      selection and the whole-matrix search ran.
    fallback: bool scalar, the per-token candidates ran (not the floor path).
    floor: float32 scalar, the next batch's selection floor.
  """
  reconstruction: topk.Reconstruction
  overflow: jax.Array
  fallback: jax.Array
  floor: jax.Array


class BatchTopKSAE(topk.TopKSAE):
  """BatchTopK SAE with AuxK, unit-norm decoder rows and a learned inference threshold."""
  name = 'batchtopk'

  def __init__(self, cfg, d_model, tuning=sparse.DEFAULT_TUNING):
    super().__init__(cfg, d_model, tuning)
    capacity = cfg.sparse_capacity
    if capacity and not cfg.k <= capacity <= self.n_latents:
      raise ValueError(f'sae.sparse_capacity={capacity} (batchtopk: candidates per token) '
                       f'must be 0 or in [k={cfg.k}, n_latents={self.n_latents}]')
    if self.block_size and not capacity:
      raise ValueError('batchtopk with sae.encoder_block_size > 0 needs '
                       'sae.sparse_capacity > 0 (per-token candidates)')
    sparse.check_block_size(self.n_latents, self.block_size, max(capacity, cfg.aux_k, cfg.k))
    if not 0.0 <= cfg.batchtopk_threshold_momentum < 1.0:
      raise ValueError('sae.batchtopk_threshold_momentum must be in [0, 1), got '
                       f'{cfg.batchtopk_threshold_momentum}')

  def init(self, key):
    params, _ = super().init(key)
    return params, {'threshold': jnp.zeros((), jnp.float32),
                    'selection_floor': jnp.zeros((), jnp.float32)}

  def logical_axes(self):
    params, _ = super().logical_axes()
    return params, {'threshold': (), 'selection_floor': ()}

  def _update_threshold(self, threshold, acts):
    """EMA of the smallest positive kept activation; unchanged if none is positive."""
    smallest = jnp.min(jnp.where(acts > 0, acts, jnp.inf))
    m = self.cfg.batchtopk_threshold_momentum
    ema = jnp.where(threshold > 0, m * threshold + (1.0 - m) * smallest, smallest)
    return lax.stop_gradient(jnp.where(jnp.isfinite(smallest), ema, threshold))

  # ---- training: the floor path, or per-token candidates -------------------

  def _floor_selection(self, params, x, floor):
    """The batch top-k among the entries above `floor` (forward only).

    Returns (sparse.Kept [B, k], usable, next floor): usable when the
    selection is exact (`sparse.batch_top`).
    """
    x_in, b_enc = self.encoder_inputs(params, x)
    candidates = self._select_positive(x_in, params['W_enc'], b_enc,
                                       jnp.broadcast_to(floor, (self.n_latents,)))
    total = x.shape[0] * self.cfg.k
    kept, exact = sparse.batch_top(candidates, total)
    return kept, exact, sparse.candidate_floor(candidates.values, total, floor, self.tuning)

  def _reconstruction_of(self, params, x, kept, aux):
    """(mse, Reconstruction) from the kept (token, latent, value) triples, selected
    without gradient: decode, error and gradient fused (`sparse.batch_mse`)."""
    mse, x_hat = sparse.batch_mse(x, params['W_enc'], params['b_enc'], params['W_dec'],
                                  params['b_dec'], kept, self.tuning)
    fvu = base.fvu_of(x, lax.stop_gradient(mse))
    return mse, topk.Reconstruction(fvu, jax.nn.relu(kept.values), kept.latents, x_hat, aux)

  def _candidates_path(self, params, x, dead_mask):
    """(mse, Path) by per-token candidates (`sparse.encode_select` in batch mode)."""
    enc = self._encode_sparse(lax.stop_gradient(params), x, dead_mask,
                              k=self.cfg.sparse_capacity, batch_k_per_token=self.cfg.k)
    floor = jnp.zeros((), jnp.float32) if enc.candidate_floor is None else enc.candidate_floor
    mse, rec = self._reconstruction_of(params, x, sparse.Kept(enc.values, enc.latents, enc.tokens),
                                       enc.aux)
    return mse, Path(rec, enc.overflow, jnp.asarray(True), floor)

  def _floor_path(self, params, x, kept, floor):
    """(mse, Path) from the kept triples of `_floor_selection`, differentiable wrt params."""
    # No AuxK selection here: the path is taken only when the dense AuxK serves.
    mse, rec = self._reconstruction_of(params, x, kept,
                                       sparse.no_aux_selection(x.shape[0], self.cfg.aux_k))
    return mse, Path(rec, jnp.asarray(False), jnp.asarray(False), floor)

  def loss(self, params, buffers, x, *, sparsity_coefficient, dead_mask, grads):
    """The floor path when it is exact, else per-token candidates; then AuxK.

    The floor path keeps the entries above `buffers['selection_floor']` (set
    from the previous batch's candidates near rank 2 * B * k) with the
    flat capacity selection, and the batch top-k among them; no per-token
    top-k is computed. It is exact whenever it is taken; the first batch, and
    any batch where the floor was too high or too low, a tie straddles the cut
    or more latents are dead than the dense AuxK path takes, run the
    per-token candidates instead. With grads, each path is differentiated on
    its own, and the AuxK term only when a latent is dead.
    """
    del sparsity_coefficient
    x = x.astype(jnp.float32)
    if dead_mask is None:
      dead_mask = jnp.zeros((self.n_latents,), bool)
    slow = lambda p: self._candidates_path(p, x, dead_mask)
    if not self.cfg.sparse_capacity:  # exhaustive: no candidates to speak of
      usable, fast = jnp.asarray(False), slow
    else:
      floor = buffers['selection_floor']
      possible = (floor > 0) & (jnp.sum(dead_mask) <= topk.aux_dense_cap(self))
      shape = (x.shape[0], self.cfg.k)
      nothing = (sparse.Kept(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32),
                             jnp.zeros(shape, jnp.int32)), jnp.asarray(False), floor)
      # Skipped (matmul included) when the floor path could not be taken anyway.
      kept, usable, floor = lax.cond(possible, lambda: self._floor_selection(params, x, floor),
                                     lambda: nothing)
      fast = lambda p: self._floor_path(p, x, kept, floor)
    (mse, path), g = base.cond_value_and_grads(usable, fast, slow, params, grads=grads)
    rec = path.reconstruction
    aux, n_dead, g = topk.aux_k_term(self, params, x, rec.aux, x - rec.x_hat, dead_mask, g)
    threshold = self._update_threshold(buffers['threshold'], rec.acts)
    out = self._output(x, mse, rec, aux, n_dead, threshold=threshold,
                       overflow=path.overflow.astype(jnp.float32),
                       selection_fallback=path.fallback.astype(jnp.float32))
    buffers = {'threshold': threshold, 'selection_floor': lax.stop_gradient(path.floor)}
    return out._replace(buffers=buffers), g

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
