"""The encoder: a dense matmul, a selection, and a backward through the selected entries only.

`encode_select` computes pre = x @ W_enc + b_enc and keeps the selected
entries (per-token top-k, BatchTopK, AuxK); its custom VJP routes the
gradient to those entries only: d_x[b] = sum_j g[b, j] W_enc[:, l_bj],
d_W_enc[:, l] = sum g x[b] and d_b_enc[l] = sum g, by row gathers and
scatters (`rows`); nothing of [B, n] is saved for the backward pass.

`attach_encoder_vjp` gives the same backward to values selected elsewhere
(a capacity selection, BatchTopK's floor path), so that a caller can select
once without gradient and differentiate inside a `lax.cond` branch.

Everything here is pure, jittable and written in `jnp`/`lax` ops only, so it
runs unchanged when `W_enc`, `b_enc`, `W_dec` are sharded along the latent axis.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from dictlearn.sae.sparse import batch as batch_lib
from dictlearn.sae.sparse import per_token
from dictlearn.sae.sparse import rows as rows_lib
from dictlearn.sae.sparse.spec import EncoderOutput
from dictlearn.sae.sparse.spec import EncoderSpec
from dictlearn.sae.sparse.spec import check_spec
from dictlearn.sae.sparse.spec import no_aux_selection
from dictlearn.sae.sparse.spec import preactivations
from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import KernelTuning

# ---------------------------------------------------------------------------
# Forward: the selection
# ---------------------------------------------------------------------------


def _select(spec, x, W_enc, b_enc, threshold, aux_mask) -> EncoderOutput:
  batch = x.shape[0]
  overflow = jnp.asarray(False)
  min_score = floor = None
  aux = no_aux_selection(batch, 0)
  if spec.batch_k_per_token and not spec.k:
    # Exhaustive BatchTopK: the whole [B, n] matrix is the candidate set.
    pre = preactivations(x, W_enc, b_enc, spec.dtype)
    if spec.aux_k:
      aux = lax.cond(jnp.sum(aux_mask) > spec.aux_min_dead,
                     lambda p: per_token.aux_select(p, aux_mask, spec.aux_k, spec.tuning),
                     lambda p: no_aux_selection(batch, spec.aux_k), pre)
    kept = batch_lib.exhaustive(pre, spec.batch_k_per_token)
  else:
    cand, selected_aux = per_token.per_token_select(x, W_enc, b_enc, threshold, aux_mask, spec)
    aux = aux if selected_aux is None else selected_aux
    if spec.batch_k_per_token:
      exhaustive = lambda: batch_lib.exhaustive(preactivations(x, W_enc, b_enc, spec.dtype),
                                                spec.batch_k_per_token)
      kept, overflow = batch_lib.from_candidates(cand, spec.batch_k_per_token, exhaustive)
      floor = batch_lib.candidate_floor(cand.scores, batch * spec.batch_k_per_token,
                                        tuning=spec.tuning)
    else:
      kept = batch_lib.Kept(cand.values, cand.latents, None)
      min_score = jnp.min(cand.scores, axis=-1)
  return EncoderOutput(kept.values, kept.latents, kept.tokens, aux.values, aux.latents,
                       overflow, min_score, floor)


# ---------------------------------------------------------------------------
# Backward: gathers and scatters at the selected entries
# ---------------------------------------------------------------------------


def encoder_grads(x, W_enc, g, latents, tokens, init=None, tuning: KernelTuning = DEFAULT_TUNING):
  """(d_x, d_W_enc^T, d_b_enc) in float32 for cotangents g at the selected entries.

  Args:
    x: [B, d] encoder input.
    W_enc: [d, n].
    g: [R, m] cotangents of the selected pre-activations.
    latents: [R, m] int32.
    tokens: None (entry [r, j] is row r's) or [R, m] int32.
    init: optional (d_x or None, d_W_enc^T [n, d], d_b_enc [n]) to add to.
    tuning: the row loops' step size.

  Returns:
    (d_x [B, d], d_W_enc^T [n, d], d_b_enc [n]), float32. d_W_enc comes
    transposed: the scatter writes whole rows of it.
  """
  n = W_enc.shape[1]
  if init is None:
    # Zeros made as a flat vector: XLA would otherwise merge them with the
    # decoder's equal zeros and copy that buffer into each accumulator.
    d = x.shape[1]
    init = (None, jnp.zeros((n * d,), jnp.float32).reshape(n, d), jnp.zeros((n,), jnp.float32))
  # d_x gathers columns of W_enc; callers that do not use d_x (the SAEs route
  # b_dec's gradient elsewhere) let XLA drop this loop and the transpose.
  W_enc_t = lax.optimization_barrier(W_enc.T)
  d_x = rows_lib.weighted_row_sum(g, latents, W_enc_t, tokens, init[0], tuning)
  d_w_t = rows_lib.scatter_rows(g, latents, x, tokens, n, init[1], tuning)
  d_b = init[2].at[latents.reshape(-1)].add(g.reshape(-1).astype(jnp.float32))
  return d_x, d_w_t, d_b


def _as_param_grads(grads, x, W_enc, b_enc):
  d_x, d_w_t, d_b = grads
  return d_x.astype(x.dtype), d_w_t.T.astype(W_enc.dtype), d_b.astype(b_enc.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _encode(spec, x, W_enc, b_enc, threshold, aux_mask):
  return _select(spec, x, W_enc, b_enc, threshold, aux_mask)


def _encode_fwd(spec, x, W_enc, b_enc, threshold, aux_mask):
  out = _select(spec, x, W_enc, b_enc, threshold, aux_mask)
  # Residuals: the inputs and the indices; never the [B, n] pre-activations.
  return out, (x, W_enc, b_enc, out.latents, out.tokens, out.aux_latents)


def _encode_bwd(spec, res, ct):
  x, W_enc, b_enc, latents, tokens, aux_latents = res
  # A zero cotangent (the selection fed only an untaken branch, as in the ReLU
  # SAEs' dense fallback) skips the scatter loops.
  grads = lax.cond(jnp.any(ct.values != 0),
                   lambda: encoder_grads(x, W_enc, ct.values, latents, tokens,
                                         tuning=spec.tuning),
                   lambda: (jnp.zeros(x.shape, jnp.float32),
                            jnp.zeros(W_enc.shape[::-1], jnp.float32),
                            jnp.zeros(b_enc.shape, jnp.float32)))
  if aux_latents.shape[1]:
    # The AuxK cotangent is exactly zero when no latent is dead: skip its loops,
    # passing the gradients through (no zero arrays to add).
    # (Opaque to XLA: a constant zero cotangent would be folded at length.)
    g_aux = lax.optimization_barrier(ct.aux_values)
    grads = lax.cond(jnp.any(g_aux != 0),
                     lambda acc: encoder_grads(x, W_enc, g_aux, aux_latents, None, acc,
                                               spec.tuning),
                     lambda acc: acc, grads)
  return _as_param_grads(grads, x, W_enc, b_enc) + (None, None)


_encode.defvjp(_encode_fwd, _encode_bwd)


def encode_select(x, W_enc, b_enc, spec: EncoderSpec, *, threshold=None,
                  aux_mask=None) -> EncoderOutput:
  """Dense pre-activations, a selection, and a sparse backward.

  Computes pre = x @ W_enc + b_enc (matmul inputs in `spec.dtype`, float32
  accumulation) and returns the pre-activations at the selected entries:
  per-token top `spec.k` of the scores (pre - threshold) + margin, or in batch
  mode the top B * batch_k_per_token of ReLU(pre) across the batch, plus
  optionally the per-token top `spec.aux_k` of pre among the `aux_mask` latents.

  The gradient wrt the selected values is routed only to the selected entries
  (`encoder_grads`). The selection itself is piecewise constant: `threshold`
  and `aux_mask` get no gradient.

  Args:
    x: [B, d] inputs.
    W_enc: [d, n].
    b_enc: [n].
    spec: EncoderSpec.
    threshold: optional [n] per-latent threshold subtracted from the scores
      (per-token mode only).
    aux_mask: [n] bool, required when spec.aux_k > 0.

  Returns:
    EncoderOutput.

  Raises:
    ValueError: on an inconsistent spec.
  """
  check_spec(spec, W_enc.shape[1], threshold=threshold, aux_mask=aux_mask)
  return _encode(spec, x, W_enc, b_enc, threshold, aux_mask if spec.aux_k else None)


# ---------------------------------------------------------------------------
# The same backward for a selection made elsewhere
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attach(tuning, values, x, W_enc, b_enc, latents, tokens):
  del tuning, x, W_enc, b_enc, latents, tokens
  return values


def _attach_fwd(tuning, values, x, W_enc, b_enc, latents, tokens):
  del tuning
  return values, (x, W_enc, b_enc, latents, tokens)


def _attach_bwd(tuning, res, g):
  x, W_enc, b_enc, latents, tokens = res
  grads = encoder_grads(x, W_enc, g, latents, tokens, tuning=tuning)
  return (jnp.zeros_like(g),) + _as_param_grads(grads, x, W_enc, b_enc) + (None, None)


_attach.defvjp(_attach_fwd, _attach_bwd)


def attach_encoder_vjp(values, x, W_enc, b_enc, latents, tokens=None,
                       tuning: KernelTuning = DEFAULT_TUNING):
  """`values`, differentiable wrt x, W_enc and b_enc with the sparse encoder VJP.

  The values must be the entries (tokens or row, latents) of x @ W_enc + b_enc,
  selected elsewhere (without gradient); their gradient is routed to those
  entries only, as in `encode_select`. Unused slots must receive a zero
  cotangent (any activation of -inf does).
  """
  return _attach(tuning, values, x, W_enc, b_enc, latents.astype(jnp.int32),
                 None if tokens is None else tokens.astype(jnp.int32))


def with_encoder_vjp(selection, x, W_enc, b_enc, tuning: KernelTuning = DEFAULT_TUNING):
  """A selection's values (any NamedTuple with values, latents and tokens: a
  capacity `Selection`, a batch `Kept`), differentiable as `attach_encoder_vjp`."""
  return attach_encoder_vjp(selection.values, x, W_enc, b_enc, selection.latents,
                            selection.tokens, tuning)
