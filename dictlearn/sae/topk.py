"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = ReLU(TopK_k((x - b_dec) @ W_enc + b_enc))      x_hat = z @ W_dec + b_dec
    loss = mse + aux_k_coefficient * aux_k

`mse` is the squared error summed over d_model and averaged over the batch.
AuxK reconstructs the residual e = x - x_hat (held fixed) from the top `aux_k`
pre-activations among the dead latents, without b_dec, so dead latents get a
gradient. Like sparsify, its scale is min(n_dead / aux_k, 1) and it is 0 when no
latent is dead. Sparsify and OpenAI divide both the main and the AuxK squared
errors by the same batch variance; here both are divided by the batch size, so
the relative weight of the two terms is theirs and `aux_k` has mse's units.

Decoder rows stay unit norm (gradient projected onto the sphere, rows
renormalised after each update); the encoder starts as the decoder's transpose.
The whole path is one dense matmul plus top-k; decoder and every backward pass
follow only the k selected latents (`kernels`).
"""
import jax
from jax import lax
import jax.numpy as jnp

from dictlearn.sae import base
from dictlearn.sae import capacity
from dictlearn.sae import kernels


# AuxK runs densely over the gathered dead latents when at most
# max(aux_k, n_latents // _AUX_DENSE_FRACTION) are dead (the usual case), for
# dictionaries of at most _AUX_DENSE_MAX_LATENTS latents. Larger ones always use
# the encoder's (blocked) AuxK selection: the dense path's gathered [B, cap]
# pre-activations and its whole-dictionary gradients would cost gigabytes there.
_AUX_DENSE_FRACTION = 8
_AUX_DENSE_MAX_LATENTS = 1 << 17


def aux_dense_cap(sae):
  """Most dead latents for which AuxK runs densely over the gathered dead ones
  (0: never; the encoder's AuxK selection serves whenever a latent is dead)."""
  if sae.n_latents > _AUX_DENSE_MAX_LATENTS:
    return 0
  return min(sae.n_latents, max(sae.cfg.aux_k, sae.n_latents // _AUX_DENSE_FRACTION))


def _dead_first(dead_mask):
  """Latent indices, dead ones first, each group in index order (a stable
  partition by cumulative sums: XLA's sort is slow on CPU)."""
  dead = dead_mask.astype(jnp.int32)
  n_dead = jnp.sum(dead)
  pos = jnp.where(dead_mask, jnp.cumsum(dead) - 1, n_dead + jnp.cumsum(1 - dead) - 1)
  latents = jnp.arange(dead_mask.shape[0], dtype=jnp.int32)
  return jnp.zeros_like(latents).at[pos].set(latents, unique_indices=True)


def _aux_reconstruction_dense(sae, params, x_in, dead_mask, cap):
  """e_hat from the top aux_k dead latents, densely over `cap` gathered latents.

  The dead latents, then the live ones, are gathered in index order and the
  live ones masked, so the selection (ties included) is the top-k of the dead
  latents' pre-activations. With aux_k / cap large (256 / 2048 at 16k latents)
  three small matmuls beat gathering aux_k rows per token.
  """
  # Opaque to XLA: a constant mask (nothing dead) would otherwise have this
  # branch, which then never runs, constant-folded at length at compile time.
  dead_mask = lax.optimization_barrier(dead_mask)
  order = _dead_first(dead_mask)[:cap]
  pre = kernels.preactivations(x_in, params['W_enc'][:, order], params['b_enc'][order],
                               sae.dtype)
  valid = jnp.arange(cap) < jnp.sum(dead_mask)
  _, pos = kernels.top_k_rows(jnp.where(valid, pre, -jnp.inf), sae.cfg.aux_k)
  rows = jnp.arange(pre.shape[0])[:, None]
  keep = jnp.zeros(pre.shape, jnp.float32).at[rows, pos].set(1.0) * valid
  acts = jax.nn.relu(pre) * lax.stop_gradient(keep)
  return jnp.dot(acts.astype(sae.dtype), params['W_dec'][order].astype(sae.dtype),
                 preferred_element_type=jnp.float32)


@jax.custom_vjp
def _with_b_dec_grad(b_enc, b_dec, W_enc):
  """b_enc, through which b_dec gets its encoder-side gradient -W_enc @ d_b_enc.

  (x - b_dec) @ W_enc + b_enc depends on b_dec only through that term; routing
  it here, rather than through x - b_dec, leaves the kernels' d_x unused.
  """
  del b_dec, W_enc
  return b_enc


def _with_b_dec_grad_fwd(b_enc, b_dec, W_enc):
  return b_enc, (b_dec, W_enc)


def _with_b_dec_grad_bwd(res, g):
  b_dec, W_enc = res
  d_b_dec = -jnp.dot(W_enc.astype(jnp.float32), g.astype(jnp.float32))
  return g, d_b_dec.astype(b_dec.dtype), None


_with_b_dec_grad.defvjp(_with_b_dec_grad_fwd, _with_b_dec_grad_bwd)


def _aux_branches(sae, x, aux_selection, err, dead_mask):
  """The AuxK loss as functions of the parameters, and which one applies.

  Three cases, chosen at run time: nothing dead (0, no work); at most
  `aux_dense_cap` dead (dense over the gathered dead latents); more (the sparse
  AuxK selection the encoder kernel made, with the encoder VJP attached).

  Returns:
    (branches, index, n_dead): branches[index](params) is the AuxK loss (sum
    over d, mean over batch units).
  """
  n_dead = jnp.sum(dead_mask.astype(jnp.float32))
  scale = jnp.minimum(n_dead / sae.cfg.aux_k, 1.0)
  err = lax.stop_gradient(err)
  cap = aux_dense_cap(sae)

  def loss(e_hat):
    diff = e_hat - err
    return scale * jnp.sum(diff * diff) / err.shape[0]

  def dense(params):
    x_in, _ = sae._encoder_inputs(params, x)
    return loss(_aux_reconstruction_dense(sae, params, x_in, dead_mask, cap))

  def sparse(params):
    x_in, b_enc = sae._encoder_inputs(params, x)
    values, latents = aux_selection
    values = capacity.attach_encoder_vjp(values, lax.stop_gradient(x_in), params['W_enc'],
                                         b_enc, latents)
    acts = jnp.where(dead_mask[latents], jax.nn.relu(values), 0.0)
    return loss(kernels.sparse_decode(acts, latents, params['W_dec']))

  branches = [lambda params: jnp.zeros((), jnp.float32)]
  if cap:
    branches.append(dense)
  if aux_selection is not None:
    branches.append(sparse)
  index = jnp.where(n_dead == 0, 0, jnp.where(n_dead <= cap, 1, len(branches) - 1))
  return branches, index, n_dead


def aux_k_loss(sae, params, x, aux_selection, err, dead_mask):
  """AuxK loss (sum over d, mean over batch units) and the number of dead latents.

  Args:
    sae: the SAE (cfg.aux_k, dtype).
    params: SAE parameters.
    x: [B, d] input (the encoder sees x - b_dec).
    aux_selection: (values, latents) [B, aux_k], the encoder kernel's AuxK
      selection, used when more than `aux_dense_cap` latents are dead; None
      when the caller guarantees that at most that many are.
    err: [B, d] residual x - x_hat; no gradient flows into it.
    dead_mask: [n] bool.

  Returns:
    (aux_k scalar, n_dead scalar float32).
  """
  if not sae.cfg.aux_k:
    return jnp.zeros((), jnp.float32), jnp.sum(dead_mask.astype(jnp.float32))
  branches, index, n_dead = _aux_branches(sae, x, aux_selection, err, dead_mask)
  # Rematerialised branches save only their operands for the backward pass:
  # otherwise every step would carry the dense branch's [B, cap] residuals, as
  # zeros when (usually) another branch runs.
  branches = branches[:1] + [jax.checkpoint(b) for b in branches[1:]]
  return lax.switch(index, branches, params), n_dead


def add_aux_k_grads(sae, params, x, aux_selection, err, dead_mask, grads):
  """The AuxK loss, and `grads` plus aux_k_coefficient times its gradient.

  Each case of `aux_k_loss` is differentiated on its own inside the switch, so
  that when no latent is dead (the usual case) nothing is computed and no
  zero gradient is formed: `grads` passes through.

  Returns:
    (aux_k scalar, n_dead scalar, grads).
  """
  if not sae.cfg.aux_k:
    return jnp.zeros((), jnp.float32), jnp.sum(dead_mask.astype(jnp.float32)), grads
  branches, index, n_dead = _aux_branches(sae, x, aux_selection, err, dead_mask)
  coefficient = sae.cfg.aux_k_coefficient

  def adding(branch):
    def run(grads):
      aux, aux_grads = jax.value_and_grad(branch)(params)
      return aux, jax.tree.map(lambda g, a: g + coefficient * a.astype(g.dtype), grads, aux_grads)
    return run

  fns = [lambda grads: (jnp.zeros((), jnp.float32), grads)] + [adding(b) for b in branches[1:]]
  aux, grads = lax.switch(index, fns, grads)
  return aux, n_dead, grads


class TopKSAE(base.SparseAutoencoder):
  """Per-token TopK SAE with AuxK, unit-norm decoder rows and sparse kernels."""
  name = 'topk'
  unit_norm_decoder = True

  def __init__(self, cfg, d_model):
    super().__init__(cfg, d_model)
    if not 0 < cfg.k <= self.n_latents:
      raise ValueError(f'sae.k={cfg.k} must be in [1, n_latents={self.n_latents}]')
    if not 0 <= cfg.aux_k <= self.n_latents:
      raise ValueError(f'sae.aux_k={cfg.aux_k} must be in [0, n_latents={self.n_latents}]')
    if cfg.aux_k_coefficient < 0:
      raise ValueError(f'sae.aux_k_coefficient must be >= 0, got {cfg.aux_k_coefficient}')
    kernels.check_block_size(self.n_latents, self.block_size, max(cfg.k, cfg.aux_k))

  def init(self, key):
    return self._tied_init(key, 1.0), {}

  def _encoder_inputs(self, params, x):
    """(x - b_dec, b_enc with b_dec's gradient): what the encoder kernels take.

    b_dec's gradient through the encoder (-W_enc @ d_b_enc) is routed through
    the bias, whose value is unchanged, rather than through the kernel's x
    input: then nothing needs the kernel's d_x, and XLA drops its gather loop.
    """
    b_dec = params['b_dec'].astype(jnp.float32)
    x_in = x.astype(jnp.float32) - b_dec
    return x_in, _with_b_dec_grad(params['b_enc'].astype(jnp.float32), b_dec, params['W_enc'])

  def _encode_sparse(self, params, x, dead_mask=None, *, k=None, batch_k_per_token=0):
    """Runs the encoder kernel on x - b_dec; returns (x - b_dec, EncoderOutput).

    Selects the per-token top `k` (default cfg.k), or in batch mode the batch top
    B * batch_k_per_token from `k` candidates per token; AuxK when dead_mask is
    given.
    """
    x_in, b_enc = self._encoder_inputs(params, x)
    aux_k = self.cfg.aux_k if dead_mask is not None else 0
    spec = self._spec(k=self.cfg.k if k is None else k, aux_k=aux_k,
                      aux_min_dead=aux_dense_cap(self), batch_k_per_token=batch_k_per_token)
    enc = kernels.encode_select(lax.stop_gradient(x_in), params['W_enc'], b_enc, spec,
                                aux_mask=dead_mask)
    return x_in, enc

  def _reconstruction(self, params, x, dead_mask):
    """(mse, (fvu, acts, enc, x_hat)): the main term, and what the rest needs."""
    _, enc = self._encode_sparse(params, x, dead_mask)
    acts = jax.nn.relu(enc.values)
    x_hat = (kernels.sparse_decode(acts, enc.latents, params['W_dec'])
             + params['b_dec'].astype(jnp.float32))
    mse, fvu = base.reconstruction_metrics(x, x_hat)
    return mse, (fvu, acts, enc, x_hat)

  def _output(self, x, mse, fvu, acts, latents, aux, n_dead):
    metrics = {
        'mse': mse, 'fvu': fvu, 'aux_k': aux, 'n_dead': n_dead,
        'l0': jnp.sum((acts > 0).astype(jnp.float32)) / x.shape[0],
    }
    fired = kernels.count_fired(acts, latents, self.n_latents)
    return base.ForwardOutput(mse + self.cfg.aux_k_coefficient * aux, metrics, fired, {})

  def forward(self, params, buffers, x, *, sparsity_coefficient, dead_mask):
    del buffers, sparsity_coefficient  # the sparsity is fixed by k
    x = x.astype(jnp.float32)
    mse, (fvu, acts, enc, x_hat) = self._reconstruction(params, x, dead_mask)
    if dead_mask is None:  # nothing dead: no AuxK term
      aux, n_dead = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    else:
      aux, n_dead = aux_k_loss(self, params, x, (enc.aux_values, enc.aux_latents), x - x_hat,
                               dead_mask)
    return self._output(x, mse, fvu, acts, enc.latents, aux, n_dead)

  def loss_and_grads(self, params, buffers, x, *, sparsity_coefficient, dead_mask):
    """The main term's gradient, plus the AuxK term's only when a latent is dead."""
    if dead_mask is None:
      return super().loss_and_grads(params, buffers, x, sparsity_coefficient=sparsity_coefficient,
                                    dead_mask=dead_mask)
    x = x.astype(jnp.float32)
    (mse, (fvu, acts, enc, x_hat)), grads = jax.value_and_grad(
        lambda p: self._reconstruction(p, x, dead_mask), has_aux=True)(params)
    aux, n_dead, grads = add_aux_k_grads(self, params, x, (enc.aux_values, enc.aux_latents),
                                         x - x_hat, dead_mask, grads)
    return self._output(x, mse, fvu, acts, enc.latents, aux, n_dead), grads

  def encode(self, params, buffers, x):
    _, enc = self._encode_sparse(params, x)
    return kernels.densify(jax.nn.relu(enc.values), enc.latents, self.n_latents)

  def reconstruct(self, params, buffers, x):
    _, enc = self._encode_sparse(params, x)
    y = kernels.sparse_decode(jax.nn.relu(enc.values), enc.latents, params['W_dec'])
    return y + params['b_dec'].astype(jnp.float32)
