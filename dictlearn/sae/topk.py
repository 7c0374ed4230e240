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
follow only the k selected latents (`dictlearn.sae.sparse`).
"""
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from dictlearn.sae import base
from dictlearn.sae import sparse


class Reconstruction(NamedTuple):
  """What the main (reconstruction) term hands to the rest of the loss.

  Attributes:
    fvu: scalar, fraction of variance unexplained.
    acts: [B, m] activations of the kept entries.
    latents: [B, m] int32 latents of the kept entries.
    x_hat: [B, d] reconstruction.
    aux: the encoder's AuxK selection (sparse.AuxSelection), zeros when
      the encoder made none.
  """
  fvu: jax.Array
  acts: jax.Array
  latents: jax.Array
  x_hat: jax.Array
  aux: sparse.AuxSelection


def aux_dense_cap(sae):
  """Most dead latents for which AuxK runs densely over the gathered dead ones
  (0: never; the encoder's AuxK selection serves whenever a latent is dead).
  See `KernelTuning.aux_dense_fraction` and `aux_dense_max_latents`."""
  if sae.n_latents > sae.tuning.aux_dense_max_latents:
    return 0
  return min(sae.n_latents, max(sae.cfg.aux_k, sae.n_latents // sae.tuning.aux_dense_fraction))


def _dead_first(dead_mask):
  """Latent indices, dead ones first, each group in index order (a stable
  partition by cumulative sums: XLA's sort is slow on CPU)."""
  dead = dead_mask.astype(jnp.int32)
  n_dead = jnp.sum(dead)
  pos = jnp.where(dead_mask, jnp.cumsum(dead) - 1, n_dead + jnp.cumsum(1 - dead) - 1)
  latents = jnp.arange(dead_mask.shape[0], dtype=jnp.int32)
  return jnp.zeros_like(latents).at[pos].set(latents, unique_indices=True)


def aux_reconstruction_dense(sae, params, x_in, dead_mask, cap):
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
  pre = sparse.preactivations(x_in, params['W_enc'][:, order], params['b_enc'][order],
                              sae.dtype)
  valid = jnp.arange(cap) < jnp.sum(dead_mask)
  _, pos = sparse.top_k_rows(jnp.where(valid, pre, -jnp.inf), sae.cfg.aux_k, sae.tuning)
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


def aux_k_loss(sae, e_hat, err, n_dead):
  """AuxK's loss: min(n_dead / aux_k, 1) * sum ||e_hat - err||^2 / B, err held fixed."""
  diff = e_hat - lax.stop_gradient(err)
  return jnp.minimum(n_dead / sae.cfg.aux_k, 1.0) * jnp.sum(diff * diff) / err.shape[0]


def _aux_branches(sae, x, aux_selection, err, dead_mask):
  """The AuxK loss as functions of the parameters, and which one applies.

  Three cases, chosen at run time: nothing dead (0, no work); at most
  `aux_dense_cap` dead (dense over the gathered dead latents); more (the sparse
  AuxK selection the encoder kernel made, with the encoder VJP attached).

  Returns:
    (branches, index, n_dead): branches[index](params) is the AuxK loss (sum
    over d, mean over batch units); branches[0] is the zero of "nothing dead".
  """
  n_dead = jnp.sum(dead_mask.astype(jnp.float32))
  cap = aux_dense_cap(sae)
  loss = lambda e_hat: aux_k_loss(sae, e_hat, err, n_dead)

  def dense(params):
    x_in, _ = sae.encoder_inputs(params, x)
    return loss(aux_reconstruction_dense(sae, params, x_in, dead_mask, cap))

  def sparse_aux(params):
    x_in, b_enc = sae.encoder_inputs(params, x)
    values = sparse.attach_encoder_vjp(aux_selection.values, lax.stop_gradient(x_in),
                                       params['W_enc'], b_enc, aux_selection.latents,
                                       tuning=sae.tuning)
    latents = aux_selection.latents
    acts = jnp.where(dead_mask[latents], jax.nn.relu(values), 0.0)
    return loss(sparse.sparse_decode(acts, latents, params['W_dec'], tuning=sae.tuning))

  branches = [lambda params: jnp.zeros((), jnp.float32)]
  if cap:
    branches.append(dense)
  if aux_selection is not None:
    branches.append(sparse_aux)
  index = jnp.where(n_dead == 0, 0, jnp.where(n_dead <= cap, 1, len(branches) - 1))
  return branches, index, n_dead


def aux_k_term(sae, params, x, aux_selection, err, dead_mask, grads):
  """The AuxK loss, and `grads` plus aux_k_coefficient times its gradient.

  Forward-only (grads None), the loss's branches other than "nothing dead" are
  rematerialised: they save only their operands for an outer jax.grad, which
  otherwise would carry the dense branch's [B, cap] residuals every step, as
  zeros when (usually) another branch runs. With grads, each branch is
  differentiated on its own inside the switch, so that when no latent is dead
  (the usual case) nothing is computed and no zero gradient is formed: `grads`
  passes through.

  Args:
    sae: the SAE (cfg.aux_k, aux_k_coefficient, dtype, tuning).
    params: SAE parameters.
    x: [B, d] input (the encoder sees x - b_dec).
    aux_selection: the encoder kernel's AuxK selection (sparse.AuxSelection),
      used when more than `aux_dense_cap` latents are dead; None when the
      caller guarantees that at most that many are.
    err: [B, d] residual x - x_hat; no gradient flows into it.
    dead_mask: [n] bool, or None (nothing is dead).
    grads: the main term's gradient dict, or None (forward only).

  Returns:
    (aux_k scalar, n_dead scalar float32, grads with the AuxK term added or None).
  """
  if dead_mask is None:
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), grads
  if not sae.cfg.aux_k:
    return jnp.zeros((), jnp.float32), jnp.sum(dead_mask.astype(jnp.float32)), grads
  branches, index, n_dead = _aux_branches(sae, x, aux_selection, err, dead_mask)
  if grads is None:
    branches = branches[:1] + [jax.checkpoint(b) for b in branches[1:]]
    return lax.switch(index, branches, params), n_dead, None
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

  def __init__(self, cfg, d_model, tuning=sparse.DEFAULT_TUNING):
    super().__init__(cfg, d_model, tuning)
    if not 0 < cfg.k <= self.n_latents:
      raise ValueError(f'sae.k={cfg.k} must be in [1, n_latents={self.n_latents}]')
    if not 0 <= cfg.aux_k <= self.n_latents:
      raise ValueError(f'sae.aux_k={cfg.aux_k} must be in [0, n_latents={self.n_latents}]')
    if cfg.aux_k_coefficient < 0:
      raise ValueError(f'sae.aux_k_coefficient must be >= 0, got {cfg.aux_k_coefficient}')
    sparse.check_block_size(self.n_latents, self.block_size, max(cfg.k, cfg.aux_k))

  def init(self, key):
    return self._tied_init(key, 1.0), {}

  def encoder_inputs(self, params, x):
    """(x - b_dec, b_enc with b_dec's gradient): what the encoder kernels take.

    b_dec's gradient through the encoder (-W_enc @ d_b_enc) is routed through
    the bias, whose value is unchanged, rather than through the kernel's x
    input: then nothing needs the kernel's d_x, and XLA drops its gather loop.
    """
    b_dec = params['b_dec'].astype(jnp.float32)
    x_in = x.astype(jnp.float32) - b_dec
    return x_in, _with_b_dec_grad(params['b_enc'].astype(jnp.float32), b_dec, params['W_enc'])

  def _encode_sparse(self, params, x, dead_mask=None, *, k=None, batch_k_per_token=0):
    """Runs the encoder kernel on x - b_dec: an EncoderOutput.

    Selects the per-token top `k` (default cfg.k), or in batch mode the batch top
    B * batch_k_per_token from `k` candidates per token; AuxK when dead_mask is
    given.
    """
    x_in, b_enc = self.encoder_inputs(params, x)
    aux_k = self.cfg.aux_k if dead_mask is not None else 0
    spec = self._spec(k=self.cfg.k if k is None else k, aux_k=aux_k,
                      aux_min_dead=aux_dense_cap(self), batch_k_per_token=batch_k_per_token)
    return sparse.encode_select(lax.stop_gradient(x_in), params['W_enc'], b_enc, spec,
                                aux_mask=dead_mask)

  def _reconstruction(self, params, x, dead_mask):
    """(mse, Reconstruction): the main term, and what the rest of the loss needs.

    With one encoder block, the whole term and its gradient run in one pass per
    tile of rows (`sparse.topk_mse`); a blocked encoder selects first
    (`sparse.encode_select`) and decodes after (`sparse.sparse_decode`).
    """
    if self.block_size in (0, self.n_latents):
      spec = self._spec(k=self.cfg.k, aux_k=self.cfg.aux_k if dead_mask is not None else 0,
                        aux_min_dead=aux_dense_cap(self))
      term = sparse.topk_mse(x, params['W_enc'], params['b_enc'], params['W_dec'],
                             params['b_dec'], spec, aux_mask=dead_mask)
      rec = Reconstruction(base.fvu_of(x, lax.stop_gradient(term.mse)),
                           jax.nn.relu(term.values), term.latents, term.x_hat, term.aux)
      return term.mse, rec
    enc = self._encode_sparse(params, x, dead_mask)
    acts = jax.nn.relu(enc.values)
    x_hat = self._sparse_decode(params, acts, enc.latents)
    mse, fvu = base.reconstruction_metrics(x, x_hat)
    return mse, Reconstruction(fvu, acts, enc.latents, x_hat, enc.aux)

  def _output(self, x, mse, rec, aux, n_dead, **metrics):
    """The ForwardOutput of the loss mse + aux_k_coefficient * aux."""
    metrics = dict(metrics, mse=mse, fvu=rec.fvu, aux_k=aux, n_dead=n_dead,
                   l0=jnp.sum((rec.acts > 0).astype(jnp.float32)) / x.shape[0])
    fired = sparse.count_fired(rec.acts, rec.latents, self.n_latents)
    return base.ForwardOutput(mse + self.cfg.aux_k_coefficient * aux, metrics, fired, {})

  def loss(self, params, buffers, x, *, sparsity_coefficient, dead_mask, grads):
    """The main term (its gradient by the kernels' VJPs), plus AuxK only when a latent is dead."""
    del buffers, sparsity_coefficient  # the sparsity is fixed by k
    x = x.astype(jnp.float32)
    (mse, rec), g = base.value_and_grads(lambda p: self._reconstruction(p, x, dead_mask),
                                         params, grads=grads)
    aux, n_dead, g = aux_k_term(self, params, x, rec.aux, x - rec.x_hat, dead_mask, g)
    return self._output(x, mse, rec, aux, n_dead), g

  def encode(self, params, buffers, x):
    enc = self._encode_sparse(params, x)
    return sparse.densify(jax.nn.relu(enc.values), enc.latents, self.n_latents)

  def reconstruct(self, params, buffers, x):
    enc = self._encode_sparse(params, x)
    return self._sparse_decode(params, jax.nn.relu(enc.values), enc.latents)
