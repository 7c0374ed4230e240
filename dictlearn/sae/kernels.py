"""Sparse encoder and decoder kernels with custom VJPs.

The dense encoder product `x @ W_enc` ([B, d] x [d, n]) is the only cost of an
SAE step that must touch every latent. Everything after it follows only the
selected latents: the forward keeps the selected pre-activations (top-k per
token, top-(k*B) across the batch, or every non-zero up to a capacity), and the
backward of the encoder and both passes of the decoder gather and scatter rows
of the weights at the selected indices. The [B, n] pre-activation matrix is never
saved for the backward pass; with `block_size > 0` it never exists whole at all.

Selections keep `lax.top_k`'s tie rule (equal scores: the lower latent index
first) on every path, so the sparse, grouped and blocked paths select exactly
what a dense formulation selects.

The sparse passes run as loops over the selected columns (one gather or one
scatter-add of B rows per column): XLA fuses them into in-place updates, where
the vectorised form materialises [B, k, d] products (measured ~3x slower on CPU
and k x more memory). Small problems, where the loop overhead would dominate,
use the vectorised form.

Everything here is pure, jittable and written in `jnp`/`lax` ops only, so it runs
unchanged when `W_enc`, `b_enc`, `W_dec` are sharded along the latent axis.
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

# Latents per group in the two-stage exact top-k (`top_k_rows`).
_TOPK_GROUP = 32
# Gathers of at most this many elements ([B, m, d]) are vectorised, not looped.
_VECTORIZE_MAX_ELEMENTS = 1 << 21


# ---------------------------------------------------------------------------
# Exact top-k
# ---------------------------------------------------------------------------


def top_k_rows(scores, k):
  """Top-k along the last axis; same values and indices as `lax.top_k`.

  For small k relative to the width, runs in two stages: the k groups of
  `_TOPK_GROUP` latents with the largest maxima must hold the top k (any group
  outside them has a maximum no larger than the k-th value), so a top-k over the
  group maxima followed by a top-k over those k groups' members is exact.
  Groups are taken in index order, which keeps the lower-index-first tie rule.

  Args:
    scores: [..., n] array.
    k: number of entries to keep (static).

  Returns:
    (values, indices), each [..., k]; indices int32.
  """
  n = scores.shape[-1]
  g = _TOPK_GROUP
  if n % g or k * g * 8 > n:
    return lax.top_k(scores, k)
  lead = scores.shape[:-1]
  grouped = scores.reshape(*lead, n // g, g)
  _, groups = lax.top_k(grouped.max(axis=-1), k)
  groups = jnp.sort(groups, axis=-1)
  candidates = jnp.take_along_axis(grouped, groups[..., None], axis=-2)
  values, pos = lax.top_k(candidates.reshape(*lead, k * g), k)
  indices = jnp.take_along_axis(groups, pos // g, axis=-1) * g + pos % g
  return values, indices.astype(jnp.int32)


# ---------------------------------------------------------------------------
# Row gathers and scatters over selected columns
# ---------------------------------------------------------------------------


def _vectorize(weights, d):
  """Small problems run as one gather and reduction: a loop's per-iteration cost
  would dominate. Large ones loop over columns so [B, m, d] is never formed."""
  return weights.size * d <= _VECTORIZE_MAX_ELEMENTS


def _weighted_row_sum(weights, latents, table, tokens):
  """out[r] += weights[r, j] * table[latents[r, j]] (into row tokens[r, j] if given).

  Args:
    weights: [R, m] float.
    latents: [R, m] int32 rows of `table`.
    table: [n, d].
    tokens: None (entry [r, j] belongs to row r) or [R, m] int32 output rows.

  Returns:
    [R, d] float32.
  """
  rows, m = weights.shape
  d = table.shape[1]
  weights = weights.astype(jnp.float32)
  if _vectorize(weights, d):
    contrib = table[latents].astype(jnp.float32) * weights[..., None]
    if tokens is None:
      return jnp.sum(contrib, axis=1)
    return jax.ops.segment_sum(contrib.reshape(-1, d), tokens.reshape(-1), num_segments=rows)
  weights_t, latents_t = weights.T, latents.T
  tokens_t = None if tokens is None else tokens.T

  def body(j, out):
    contrib = table[latents_t[j]].astype(jnp.float32) * weights_t[j][:, None]
    if tokens_t is None:
      return out + contrib
    return out.at[tokens_t[j]].add(contrib)

  return lax.fori_loop(0, m, body, jnp.zeros((rows, d), jnp.float32))


def _scatter_rows(weights, latents, source, tokens, n):
  """out[latents[r, j]] += weights[r, j] * source[tokens[r, j] or r].

  Args:
    weights: [R, m] float.
    latents: [R, m] int32 destination rows in [0, n).
    source: [R, d] rows to scatter.
    tokens: None or [R, m] int32 rows of `source`.
    n: number of output rows.

  Returns:
    [n, d] float32.
  """
  d = source.shape[1]
  weights = weights.astype(jnp.float32)
  source = source.astype(jnp.float32)
  if _vectorize(weights, d):
    src = source[:, None, :] if tokens is None else source[tokens]
    contrib = (src * weights[..., None]).reshape(-1, d)
    return jax.ops.segment_sum(contrib, latents.reshape(-1), num_segments=n)
  weights_t, latents_t = weights.T, latents.T
  tokens_t = None if tokens is None else tokens.T

  def body(j, out):
    src = source if tokens_t is None else source[tokens_t[j]]
    return out.at[latents_t[j]].add(src * weights_t[j][:, None])

  return lax.fori_loop(0, weights.shape[1], body, jnp.zeros((n, d), jnp.float32))


def _row_dots(rows_src, latents, table, tokens):
  """out[r, j] = <rows_src[tokens[r, j] or r], table[latents[r, j]]>, [R, m] float32."""
  rows_src = rows_src.astype(jnp.float32)
  if _vectorize(latents, table.shape[1]):
    src = rows_src[:, None, :] if tokens is None else rows_src[tokens]
    return jnp.sum(src * table[latents].astype(jnp.float32), axis=-1)
  latents_t = latents.T
  tokens_t = None if tokens is None else tokens.T

  def body(j, out):
    src = rows_src if tokens_t is None else rows_src[tokens_t[j]]
    dots = jnp.sum(src * table[latents_t[j]].astype(jnp.float32), axis=-1)
    return out.at[j].set(dots)

  out = jnp.zeros(latents_t.shape, jnp.float32)
  return lax.fori_loop(0, latents_t.shape[0], body, out).T


# ---------------------------------------------------------------------------
# Sparse decoder
# ---------------------------------------------------------------------------


@jax.custom_vjp
def _sparse_decode(values, latents, W_dec, tokens):
  return _weighted_row_sum(values, latents, W_dec, tokens)


def _sparse_decode_fwd(values, latents, W_dec, tokens):
  out = _weighted_row_sum(values, latents, W_dec, tokens)
  return out, (values, latents, W_dec, tokens)


def _sparse_decode_bwd(res, g):
  values, latents, W_dec, tokens = res
  d_values = _row_dots(g, latents, W_dec, tokens).astype(values.dtype)
  d_W_dec = _scatter_rows(values, latents, g, tokens, W_dec.shape[0])
  return d_values, None, d_W_dec.astype(W_dec.dtype), None


_sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def sparse_decode(values, latents, W_dec, tokens=None):
  """Decodes sparse activations without forming the dense [B, n] matrix.

  out[r] = sum_j values[r, j] * W_dec[latents[r, j]], or, with `tokens`,
  out[tokens[r, j]] += values[r, j] * W_dec[latents[r, j]] (flat (token, latent,
  value) triples laid out in R = B rows, as BatchTopK produces). The custom VJP
  gathers W_dec rows for d_values and scatter-adds values * g into the selected
  rows of d_W_dec. Accumulates in float32; no decoder bias is added.

  Args:
    values: [B, m] activations.
    latents: [B, m] int32 latent indices.
    W_dec: [n, d] decoder.
    tokens: optional [B, m] int32 output rows.

  Returns:
    [B, d] float32.
  """
  return _sparse_decode(values, latents.astype(jnp.int32), W_dec,
                        None if tokens is None else tokens.astype(jnp.int32))


def topk_decode(values, indices, W_dec):
  """Decodes per-token top-k activations: [B, k], [B, k], [n, d] -> [B, d]."""
  return sparse_decode(values, indices, W_dec)


# ---------------------------------------------------------------------------
# Sparse encoder
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Static description of one encoder selection (hashable: a jit constant).

  Attributes:
    k: per-token selections; in batch mode the per-token candidates (0 = an
      exhaustive selection over the whole [B, n] matrix).
    aux_k: extra per-token selections among the latents of `aux_mask` (AuxK).
    aux_min_dead: the AuxK selection runs only when more than this many
      latents are in `aux_mask`; otherwise it returns zeros (values and
      indices), and its gradient pass is skipped.
    batch_k_per_token: > 0 selects batch mode: keep the B * batch_k_per_token
      largest ReLU'd pre-activations across the whole batch (BatchTopK).
    margin: selection score is (pre - threshold) + margin.
    block_size: latents per encoder block (0 = one block).
    dtype: name of the matmul input dtype ('float32' or 'bfloat16').
  """
  k: int
  aux_k: int = 0
  aux_min_dead: int = 0
  batch_k_per_token: int = 0
  margin: float = 0.0
  block_size: int = 0
  dtype: str = 'float32'


class EncoderOutput(NamedTuple):
  """Selected entries of the pre-activation matrix pre = x @ W_enc + b_enc.

  Attributes:
    values: [B, m] float32 pre-activations at the selected entries (no ReLU).
    latents: [B, m] int32 latent index of each entry.
    tokens: None (entry [b, j] is token b's) or [B, m] int32 token of each entry
      (batch mode: B * m flat triples).
    aux_values: [B, aux_k] float32 pre-activations of the AuxK selection.
    aux_latents: [B, aux_k] int32.
    overflow: bool scalar; batch mode only: the per-token candidates could not
      hold the batch selection, so the exhaustive selection was used.
    min_score: [B] float32, per-token mode: each token's k-th largest score.
      (A reduction, not a slice: XLA on CPU turns a top-k whose outputs are
      sliced into a full sort of each row, 10-100x slower.)
  """
  values: jax.Array
  latents: jax.Array
  tokens: jax.Array | None
  aux_values: jax.Array
  aux_latents: jax.Array
  overflow: jax.Array
  min_score: jax.Array | None


def preactivations(x, W_enc, b_enc, dtype):
  """x @ W_enc + b_enc: matmul inputs cast to `dtype`, float32 accumulation and result."""
  dtype = jnp.dtype(dtype)
  pre = jnp.dot(x.astype(dtype), W_enc.astype(dtype),
                preferred_element_type=jnp.float32)
  return pre + b_enc.astype(jnp.float32)


def _scores(pre, threshold, spec):
  s = jnp.maximum(pre, 0.0) if spec.batch_k_per_token else pre
  if threshold is not None:
    s = s - threshold.astype(jnp.float32)
  if spec.margin:
    s = s + jnp.float32(spec.margin)
  return s


def _values_at(scores, top_scores, pre, latents):
  """Pre-activations at the selected entries; free when the scores are pre itself."""
  if scores is pre:
    return top_scores
  return jnp.take_along_axis(pre, latents, axis=-1)


def _select(scores, pre, k):
  _, latents = top_k_rows(scores, k)
  return jnp.take_along_axis(pre, latents, axis=-1), latents


def _aux_select(pre, aux_mask, aux_k):
  masked = jnp.where(aux_mask[None, :], pre, -jnp.inf)
  return _select(masked, pre, aux_k)


def _merge(run, new, k):
  """Merges two (scores, values, latents) top lists; `run` wins ties (lower indices)."""
  scores = jnp.concatenate([run[0], new[0]], axis=-1)
  _, pos = lax.top_k(scores, k)
  return tuple(jnp.take_along_axis(jnp.concatenate([a, b], axis=-1), pos, axis=-1)
               for a, b in zip(run, new))


def _per_token_unblocked(x, W_enc, b_enc, threshold, aux_mask, spec):
  pre = preactivations(x, W_enc, b_enc, spec.dtype)
  scores = _scores(pre, threshold, spec)
  if spec.k:
    top_scores, latents = top_k_rows(scores, spec.k)
    main = (top_scores, _values_at(scores, top_scores, pre, latents), latents)
  else:
    main = None
  aux = None
  if spec.aux_k:
    batch = x.shape[0]
    # The AuxK top-k over [B, n] costs as much as the main one: run it only
    # when more than aux_min_dead latents are dead.
    aux = lax.cond(jnp.sum(aux_mask) > spec.aux_min_dead,
                   lambda p: _aux_select(p, aux_mask, spec.aux_k),
                   lambda p: (jnp.zeros((batch, spec.aux_k), jnp.float32),
                              jnp.zeros((batch, spec.aux_k), jnp.int32)),
                   pre)
  return main, aux, pre


def _per_token_blocked(x, W_enc, b_enc, threshold, aux_mask, spec):
  """Running top-k merge over blocks of latents; [B, n] never exists whole."""
  batch = x.shape[0]
  bs = spec.block_size
  n_blocks = W_enc.shape[1] // bs

  def empty(k):
    return (jnp.full((batch, k), -jnp.inf, jnp.float32),
            jnp.zeros((batch, k), jnp.float32),
            jnp.zeros((batch, k), jnp.int32))

  run_aux = jnp.sum(aux_mask) > spec.aux_min_dead if spec.aux_k else None

  def body(i, carry):
    main, aux = carry
    start = i * bs
    w = lax.dynamic_slice_in_dim(W_enc, start, bs, axis=1)
    b = lax.dynamic_slice_in_dim(b_enc, start, bs)
    thr = None if threshold is None else lax.dynamic_slice_in_dim(threshold, start, bs)
    pre = preactivations(x, w, b, spec.dtype)
    scores = _scores(pre, thr, spec)
    top_scores, lat = top_k_rows(scores, spec.k)
    new = (top_scores, _values_at(scores, top_scores, pre, lat), lat + start)
    main = _merge(main, new, spec.k)
    if spec.aux_k:
      def merge_aux(aux):
        mask = lax.dynamic_slice_in_dim(aux_mask, start, bs)
        masked = jnp.where(mask[None, :], pre, -jnp.inf)
        top_scores, lat = top_k_rows(masked, spec.aux_k)
        new = (top_scores, jnp.take_along_axis(pre, lat, axis=-1), lat + start)
        return _merge(aux, new, spec.aux_k)
      aux = lax.cond(run_aux, merge_aux, lambda aux: aux, aux)
    return main, aux

  init = (empty(spec.k), empty(spec.aux_k) if spec.aux_k else None)
  main, aux = lax.fori_loop(0, n_blocks, body, init)
  # A skipped AuxK selection keeps its initial values and indices: zeros.
  return main, (None if aux is None else aux[1:])


def _exhaustive_batch_select(pre, spec):
  """BatchTopK over the whole flattened [B, n] matrix (the exact reference)."""
  batch, n = pre.shape
  total = batch * spec.batch_k_per_token
  _, pos = lax.top_k(jnp.maximum(pre, 0.0).reshape(-1), total)
  values = pre.reshape(-1)[pos]
  return values, (pos % n).astype(jnp.int32), (pos // n).astype(jnp.int32)


def _batch_select(main, pre, x, W_enc, b_enc, spec):
  """Keeps B * k_per_token entries across the batch from per-token candidates.

  Candidates are laid out token-major and, within a token, in rank order (ties
  by latent index), so the flat top-k breaks ties like the exhaustive one. The
  candidates are exact unless some token had its last candidate kept with a
  positive value (it might have had more); then the exhaustive selection runs,
  on `pre` when the caller has it, else (blocked encoder) recomputing it.
  """
  batch = x.shape[0]
  cand_scores, cand_values, cand_latents = main
  c = cand_scores.shape[1]
  total = batch * spec.batch_k_per_token
  top, pos = lax.top_k(cand_scores.reshape(-1), total)
  overflow = jnp.any((pos % c == c - 1) & (top > 0))
  fast = (cand_values.reshape(-1)[pos], cand_latents.reshape(-1)[pos],
          (pos // c).astype(jnp.int32))

  def exhaustive():
    full = preactivations(x, W_enc, b_enc, spec.dtype) if pre is None else pre
    return _exhaustive_batch_select(full, spec)

  values, latents, tokens = lax.cond(overflow, exhaustive, lambda: fast)
  shape = (batch, spec.batch_k_per_token)
  return values.reshape(shape), latents.reshape(shape), tokens.reshape(shape), overflow


def _encode_forward(spec, x, W_enc, b_enc, threshold, aux_mask):
  batch = x.shape[0]
  pre = None
  if spec.block_size:
    main, aux = _per_token_blocked(x, W_enc, b_enc, threshold, aux_mask, spec)
  else:
    main, aux, pre = _per_token_unblocked(x, W_enc, b_enc, threshold, aux_mask, spec)
  if aux is None:
    aux = (jnp.zeros((batch, 0), jnp.float32), jnp.zeros((batch, 0), jnp.int32))
  overflow = jnp.asarray(False)
  min_score = None
  if spec.batch_k_per_token:
    if spec.k:
      values, latents, tokens, overflow = _batch_select(main, pre, x, W_enc, b_enc, spec)
    else:
      values, latents, tokens = _exhaustive_batch_select(pre, spec)
      shape = (batch, spec.batch_k_per_token)
      values, latents, tokens = (a.reshape(shape) for a in (values, latents, tokens))
  else:
    top_scores, values, latents = main
    tokens = None
    min_score = jnp.min(top_scores, axis=-1)
  return EncoderOutput(values, latents, tokens, aux[0], aux[1], overflow, min_score)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _encode(spec, x, W_enc, b_enc, threshold, aux_mask):
  return _encode_forward(spec, x, W_enc, b_enc, threshold, aux_mask)


def _encode_fwd(spec, x, W_enc, b_enc, threshold, aux_mask):
  out = _encode_forward(spec, x, W_enc, b_enc, threshold, aux_mask)
  # Residuals: the inputs and the indices; never the [B, n] pre-activations.
  res = (x, W_enc, b_enc, out.latents, out.tokens, out.aux_latents)
  return out, res


def _encoder_grads(x, W_enc_t, g, latents, tokens):
  """(d_x, d_W_enc^T, d_b_enc) in float32 for cotangents g at the selected entries."""
  n = W_enc_t.shape[0]
  d_x = _weighted_row_sum(g, latents, W_enc_t, tokens)
  d_w_t = _scatter_rows(g, latents, x, tokens, n)
  d_b = jax.ops.segment_sum(g.reshape(-1), latents.reshape(-1), num_segments=n)
  return d_x, d_w_t, d_b


def _encode_bwd(spec, res, ct):
  del spec
  x, W_enc, b_enc, latents, tokens, aux_latents = res
  # Materialised once so that the per-column gathers read contiguous rows.
  W_enc_t = lax.optimization_barrier(W_enc.T)
  grads = _encoder_grads(x, W_enc_t, ct.values, latents, tokens)
  if aux_latents.shape[1]:
    # The AuxK cotangent is exactly zero when no latent is dead: skip its loops.
    g_aux = ct.aux_values
    aux = lax.cond(jnp.any(g_aux != 0),
                   lambda: _encoder_grads(x, W_enc_t, g_aux, aux_latents, None),
                   lambda: jax.tree.map(jnp.zeros_like, grads))
    grads = jax.tree.map(jnp.add, grads, aux)
  d_x, d_w_t, d_b = grads
  return (d_x.astype(x.dtype), d_w_t.T.astype(W_enc.dtype), d_b.astype(b_enc.dtype),
          None, None)


_encode.defvjp(_encode_fwd, _encode_bwd)


def check_block_size(n_latents, block_size, k_max, what='sae.encoder_block_size'):
  """Raises ValueError unless `block_size` is 0 or a divisor of n_latents >= k_max."""
  if block_size < 0 or (block_size and (n_latents % block_size or block_size < k_max)):
    raise ValueError(
        f'{what}={block_size} must be 0 (one block) or a divisor of n_latents='
        f'{n_latents} that is at least {k_max} (the largest per-token selection).')


def encode_select(x, W_enc, b_enc, spec, *, threshold=None, aux_mask=None):
  """Dense pre-activations, a selection, and a sparse backward.

  Computes pre = x @ W_enc + b_enc (matmul inputs in `spec.dtype`, float32
  accumulation) and returns the pre-activations at the selected entries:
  per-token top `spec.k` of the scores (pre - threshold) + margin, or in batch
  mode the top B * batch_k_per_token of ReLU(pre) across the batch, plus
  optionally the per-token top `spec.aux_k` of pre among the `aux_mask` latents.

  The gradient wrt the selected values is routed only to the selected entries:
  d_x[b] = sum_j g[b, j] W_enc[:, l_bj], d_W_enc[:, l] = sum g x[b] (scatter),
  d_b_enc[l] = sum g. The selection itself is piecewise constant: `threshold`
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
  n = W_enc.shape[1]
  per_token = max(spec.k, spec.aux_k)
  if spec.batch_k_per_token:
    if threshold is not None:
      raise ValueError('batch mode does not take a threshold')
    if spec.k and spec.k < spec.batch_k_per_token:
      raise ValueError(f'batch-mode candidates per token ({spec.k}) must be at least '
                       f'k={spec.batch_k_per_token}')
    if spec.block_size and not spec.k:
      raise ValueError('a blocked batch-mode encoder needs per-token candidates (k > 0)')
  elif spec.k < 1:
    raise ValueError(f'k must be positive, got {spec.k}')
  if per_token > n:
    raise ValueError(f'cannot select {per_token} of {n} latents per token')
  check_block_size(n, spec.block_size, per_token)
  if spec.aux_k and aux_mask is None:
    raise ValueError('aux_k > 0 needs aux_mask')
  if not spec.aux_k:
    aux_mask = None
  return _encode(spec, x, W_enc, b_enc, threshold, aux_mask)


def topk_encode(x, W_enc, b_enc, k, *, block_size=0, dtype='float32'):
  """Per-token top-k of x @ W_enc + b_enc with a sparse backward.

  Args:
    x: [B, d].
    W_enc: [d, n].
    b_enc: [n].
    k: latents kept per token.
    block_size: latents per encoder block (0 = one block).
    dtype: matmul input dtype name.

  Returns:
    (values [B, k] float32 pre-activations, indices [B, k] int32).
  """
  out = encode_select(x, W_enc, b_enc, EncoderSpec(k=k, block_size=block_size, dtype=dtype))
  return out.values, out.latents


def capacity_select(x, W_enc, b_enc, capacity, *, threshold=None, margin=0.0,
                    block_size=0, dtype='float32'):
  """Keeps per token up to `capacity` entries whose score (pre - threshold) + margin > 0.

  Selects the top capacity + 1 scores; the batch overflows when some token's
  (capacity + 1)-th score is still positive, i.e. it has more entries that
  matter than the capacity holds. The caller must then use a dense formulation
  (see `lax.cond` in the ReLU and JumpReLU SAEs) so results stay exact.
  Without overflow the extra column holds only entries with score <= 0, which
  the activations zero, so it is returned as is: slicing the outputs of a
  top-k makes XLA on CPU turn it into a full sort of each row.

  Returns:
    (values [B, capacity + 1] pre-activations, latents [B, capacity + 1],
    overflow bool scalar).
  """
  spec = EncoderSpec(k=capacity + 1, margin=margin, block_size=block_size, dtype=dtype)
  out = encode_select(x, W_enc, b_enc, spec, threshold=threshold)
  return out.values, out.latents, jnp.any(out.min_score > 0)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def count_fired(acts, latents, n):
  """Tokens on which each latent is active (acts > 0): [n] float32."""
  return jax.ops.segment_sum((acts > 0).astype(jnp.float32).reshape(-1),
                             latents.reshape(-1), num_segments=n)


def densify(acts, latents, n, tokens=None):
  """Scatters sparse activations into a dense [B, n] float32 matrix."""
  batch = acts.shape[0]
  rows = (jnp.broadcast_to(jnp.arange(batch)[:, None], acts.shape)
          if tokens is None else tokens)
  return jnp.zeros((batch, n), jnp.float32).at[rows, latents].add(acts.astype(jnp.float32))
