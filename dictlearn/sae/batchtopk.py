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
  capacity selection (`capacity.select_positive`, C slots per token on
  average) and the global top k * B is taken among them. No per-token top-k.
* per-token candidates (the first batch, and any batch where the floor path
  would not be exact): each token's top C candidates, then the global top
  k * B among those; exact unless a token needs more than C, and then, for
  that batch, the selection runs over the whole [B, n] matrix.

With `sparse_capacity` C = 0 the selection always runs over the whole matrix:
exact and much slower. The metrics `selection_fallback` and `overflow` say
when a batch took the second path and the whole-matrix search.
"""
import jax
from jax import lax
import jax.numpy as jnp

from dictlearn.sae import base
from dictlearn.sae import capacity
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

    Returns (kept Selection [B, k], usable, next floor): usable when the
    selection is exact (`capacity.batch_top`).
    """
    x_in, b_enc = self._encoder_inputs(params, x)
    stop = lax.stop_gradient
    candidates = capacity.select_positive(
        stop(x_in), stop(params['W_enc']), stop(b_enc), self.cfg.sparse_capacity,
        threshold=jnp.broadcast_to(stop(floor), (self.n_latents,)), block_size=self.block_size,
        dtype=jnp.dtype(self.dtype).name)
    total = x.shape[0] * self.cfg.k
    kept, exact = capacity.batch_top(candidates, total)
    return kept, exact, kernels.candidate_floor(candidates.values, total, floor)

  def _reconstruction(self, params, x, kept, aux_selection, flags):
    """(mse, parts): the main term from the kept (values, latents, tokens) triples.

    `parts` carries what the rest of the loss and the metrics need, with the
    same structure on both paths: (fvu, acts, latents, x_hat, aux_selection,
    flags), flags = (overflow, selection_fallback, next floor).
    """
    values, latents, tokens = kept
    acts = jax.nn.relu(values)
    x_hat = (kernels.sparse_decode(acts, latents, params['W_dec'], tokens=tokens)
             + params['b_dec'].astype(jnp.float32))
    mse, fvu = base.reconstruction_metrics(x, x_hat)
    return mse, (fvu, acts, latents, x_hat, aux_selection, flags)

  def _candidates_path(self, params, x, dead_mask):
    """Per-token candidates (`kernels.encode_select` in batch mode)."""
    _, enc = self._encode_sparse(params, x, dead_mask, k=self.cfg.sparse_capacity,
                                 batch_k_per_token=self.cfg.k)
    floor = jnp.zeros((), jnp.float32) if enc.candidate_floor is None else enc.candidate_floor
    return self._reconstruction(params, x, (enc.values, enc.latents, enc.tokens),
                                (enc.aux_values, enc.aux_latents),
                                (enc.overflow, jnp.asarray(True), floor))

  def _floor_path(self, params, x, kept, floor):
    """The kept triples of `_floor_selection`, differentiable wrt the parameters."""
    x_in, b_enc = self._encoder_inputs(params, x)
    values = capacity.with_encoder_vjp(kept, lax.stop_gradient(x_in), params['W_enc'], b_enc)
    # No AuxK selection here: the path is taken only when the dense AuxK serves.
    no_aux = (jnp.zeros((x.shape[0], self.cfg.aux_k), jnp.float32),
              jnp.zeros((x.shape[0], self.cfg.aux_k), jnp.int32))
    return self._reconstruction(params, x, (values, kept.latents, kept.tokens), no_aux,
                                (jnp.asarray(False), jnp.asarray(False), floor))

  def _run(self, params, buffers, x, dead_mask, grads):
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
      nothing = (capacity.Selection(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32),
                                    jnp.zeros(shape, jnp.int32), jnp.asarray(True),
                                    jnp.zeros((), jnp.int32)), jnp.asarray(False), floor)
      # Skipped (matmul included) when the floor path could not be taken anyway.
      kept, usable, floor = lax.cond(possible, lambda: self._floor_selection(params, x, floor),
                                     lambda: nothing)
      fast = lambda p: self._floor_path(p, x, kept, floor)
    differentiate = lambda f: lambda p: jax.value_and_grad(f, has_aux=True)(p)
    if grads:
      (mse, parts), g = lax.cond(usable, differentiate(fast), differentiate(slow), params)
    else:
      mse, parts = lax.cond(usable, fast, slow, params)
    fvu, acts, latents, x_hat, aux_selection, (overflow, fallback, floor) = parts
    if grads:
      aux, n_dead, g = topk.add_aux_k_grads(self, params, x, aux_selection, x - x_hat,
                                            dead_mask, g)
    else:
      aux, n_dead = topk.aux_k_loss(self, params, x, aux_selection, x - x_hat, dead_mask)
    threshold = self._update_threshold(buffers['threshold'], acts)
    metrics = {
        'mse': mse, 'fvu': fvu, 'aux_k': aux, 'n_dead': n_dead,
        'l0': jnp.sum((acts > 0).astype(jnp.float32)) / x.shape[0],
        'threshold': threshold,
        'overflow': overflow.astype(jnp.float32),
        'selection_fallback': fallback.astype(jnp.float32),
    }
    fired = kernels.count_fired(acts, latents, self.n_latents)
    buffers = {'threshold': threshold, 'selection_floor': lax.stop_gradient(floor)}
    out = base.ForwardOutput(mse + self.cfg.aux_k_coefficient * aux, metrics, fired, buffers)
    return (out, g) if grads else out

  def forward(self, params, buffers, x, *, sparsity_coefficient, dead_mask):
    del sparsity_coefficient
    return self._run(params, buffers, x, dead_mask, grads=False)

  def loss_and_grads(self, params, buffers, x, *, sparsity_coefficient, dead_mask):
    del sparsity_coefficient
    return self._run(params, buffers, x, dead_mask, grads=True)

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
