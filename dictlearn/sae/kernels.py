"""Sparse encoder and decoder kernels with custom VJPs.

The dense encoder product `x @ W_enc` ([B, d] x [d, n]) is the only cost of an
SAE step that must touch every latent. Everything after it follows only the
selected latents: the forward keeps the selected pre-activations (top-k per
token or top-(k*B) across the batch here; every non-zero up to a capacity in
`capacity`), and the backward of the encoder and both passes of the decoder
gather and scatter rows of the weights at the selected indices.

The [B, n] pre-activation matrix never exists whole: the encoder runs over
tiles of rows (about 32 MiB of pre-activations each) and, with
`block_size > 0`, over blocks of latents, selecting as it goes; nothing of
[B, n] is saved for the backward pass. On CPU a large fresh buffer costs more
to page in than to compute, so this is also what makes the step fast.

Selections keep `lax.top_k`'s tie rule (equal scores: the lower latent index
first) on every path, so the sparse, grouped, tiled and blocked paths select
exactly what a dense formulation selects. The top-k itself runs in two masked
stages over groups of latents (`top_k_rows`), several times cheaper than one
lax.top_k over the row on CPU.

The sparse passes loop over steps of rows, each one vectorised gather or
scatter-add of [rows, m, d] elements (at most _VECTORIZE_MAX_ELEMENTS): XLA
runs the scatter-adds in place; small problems take a single step.

Everything here is pure, jittable and written in `jnp`/`lax` ops only, so it runs
unchanged when `W_enc`, `b_enc`, `W_dec` are sharded along the latent axis (the
row loops run along an unsharded axis).
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

# The two-stage exact top-k (`top_k_rows`) splits rows into groups of about
# sqrt(width / k) latents (a power of two in this range) and needs at least
# _TOPK_MIN_GROUPS_PER_K * k groups; narrower rows use lax.top_k directly.
_TOPK_GROUP_RANGE = (8, 128)
_TOPK_MIN_GROUPS_PER_K = 4
# The unblocked encoder runs over tiles of rows whose [rows, n] float32
# pre-activations take about this many bytes (and at least _MIN_TILE_ROWS rows,
# so that each pass over W_enc serves many tokens).
_TILE_BYTES = 32 << 20
_MIN_TILE_ROWS = 512
# The blocked encoder collects each block's candidates and selects once when
# there are at most this many per token; beyond, it merges block by block.
_MAX_COLLECTED = 2048
# Each step of the sparse row loops gathers or scatters at most this many
# elements ([rows, m, d]); 64 rows of 32 entries of 576 floats.
_VECTORIZE_MAX_ELEMENTS = 1 << 21
# `score_near_rank` sorts a strided sample of at most this many scores.
_RANK_SAMPLE = 1 << 15
# The candidate floor of batch mode sits at rank _FLOOR_SLACK * B * k.
_FLOOR_SLACK = 2


# ---------------------------------------------------------------------------
# Exact top-k
# ---------------------------------------------------------------------------


def _group_size(n, k):
  """Latents per group for the two-stage top-k, or 0 when lax.top_k is better."""
  lo, hi = _TOPK_GROUP_RANGE
  g = lo
  while g < hi and g * g * 2 <= n // k:
    g *= 2
  if n % g or n // g < _TOPK_MIN_GROUPS_PER_K * k:
    return 0
  return g


def _mask_below_kth_bound(v, k):
  """Sets to -inf the entries of v [..., m] that cannot be among its top k.

  Splits v into k contiguous runs (the tail past k * (m // k) joins none): each
  run's maximum is an entry of v, so at least k entries are >= the smallest run
  maximum, and so is the k-th largest. Entries below that bound are masked;
  entries equal to it are kept, so ties are unaffected. Masked entries make
  lax.top_k cheap (it is dominated by insertions into its heap)."""
  runs = v.shape[-1] // k
  if runs < 2:
    return v
  lead = v.shape[:-1]
  run_max = v[..., :k * runs].reshape(*lead, k, runs).max(axis=-1)
  bound = jnp.min(run_max, axis=-1, keepdims=True)
  return jnp.where(v >= bound, v, -jnp.inf)


def top_k_rows(scores, k):
  """Top-k along the last axis; same values and indices as `lax.top_k`.

  When k is small relative to the width, runs in two stages over groups of g
  latents: the k groups with the largest maxima must hold the top k (any group
  outside them has a maximum no larger than the k-th value), so a top-k over
  the group maxima followed by a top-k over those k groups' members is exact.
  The groups are gathered in index order, which keeps lax's tie rule (equal
  values: the lower index first). Both stages mask entries below a lower bound
  of the k-th value first (`_mask_below_kth_bound`; in the second stage the
  k-th largest group maximum), which cuts lax.top_k's cost on CPU about 3x.
  NaN scores are not supported.

  Args:
    scores: [R, n] or [n] array.
    k: number of entries to keep (static).

  Returns:
    (values, indices), each [..., k]; indices int32.
  """
  if scores.ndim == 1:
    values, indices = top_k_rows(scores[None], k)
    return values[0], indices[0]
  return _top_k_of(scores, k)


def _top_k_of(raw, k, vectors=(), score=None):
  """`top_k_rows` of score(raw, *vectors) without forming the [R, n] scores.

  `score` is elementwise; `vectors` are [n] per-latent operands broadcast along
  the rows (a bias, a threshold). It is applied inside the group-maximum
  reduction and to the gathered candidates only, which saves a whole pass over
  the [R, n] block; the scores it returns are bit-identical to score applied to
  the whole block.
  """
  if score is None:
    score = lambda r: r
  rows, n = raw.shape
  g = _group_size(n, k)
  if not g:
    return lax.top_k(score(raw, *vectors), k)
  n_groups = n // g
  grouped = raw.reshape(rows, n_groups, g)
  group_max = score(grouped, *(v.reshape(n_groups, g) for v in vectors)).max(axis=-1)
  group_max, groups = lax.top_k(_mask_below_kth_bound(group_max, k), k)
  # The k-th largest group maximum bounds the k-th value from below. (A
  # reduction, not a slice: a sliced top-k becomes a full sort on CPU.)
  floor = jnp.min(group_max, axis=-1, keepdims=True)
  groups = jnp.sort(groups, axis=-1)
  # One gather of whole groups (rows of g) from the flattened [rows * groups, g].
  flat = (jnp.arange(rows, dtype=jnp.int32)[:, None] * n_groups + groups).reshape(-1)
  candidates = jnp.take(grouped.reshape(rows * n_groups, g), flat, axis=0,
                        indices_are_sorted=True, unique_indices=True,
                        mode='clip').reshape(rows, k * g)
  candidate_vectors = tuple(
      jnp.take(v.reshape(n_groups, g), groups, axis=0, mode='clip').reshape(rows, k * g)
      for v in vectors)
  latents = (groups[..., None] * g + jnp.arange(g, dtype=jnp.int32)).reshape(rows, k * g)
  candidates = score(candidates, *candidate_vectors)
  _, pos = lax.top_k(jnp.where(candidates >= floor, candidates, -jnp.inf), k)
  values = jnp.take_along_axis(candidates, pos, axis=-1)
  return values, jnp.take_along_axis(latents, pos, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Row gathers and scatters over selected columns
# ---------------------------------------------------------------------------


def _row_tile(rows, m, d):
  """Rows of entries handled per step of the row-op loops.

  A step gathers or scatters [tile, m, d] elements as one vectorised op; the
  largest divisor of `rows` that keeps this within _VECTORIZE_MAX_ELEMENTS (all
  rows at once for small problems, where a loop's per-step cost would dominate).
  """
  target = max(1, _VECTORIZE_MAX_ELEMENTS // max(1, m * d))
  if target >= rows:
    return rows
  return max(t for t in range(1, target + 1) if rows % t == 0)


def _tiled(a, tile):
  """[R, ...] -> [tile, R // tile, ...]: step i takes rows i, i + T, ... (T steps).

  The leading axis keeps any sharding of the rows; loops run along axis 1."""
  return a.reshape(tile, a.shape[0] // tile, *a.shape[1:])


def _step(a, i):
  return lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False)


def _weighted_row_sum(weights, latents, table, tokens, init=None):
  """out[r] += weights[r, j] * table[latents[r, j]] (into row tokens[r, j] if given).

  Args:
    weights: [R, m] float.
    latents: [R, m] int32 rows of `table`.
    table: [n, d].
    tokens: None (entry [r, j] belongs to row r) or [R, m] int32 output rows.
    init: optional [R, d] float32 to accumulate into (default zeros).

  Returns:
    [R, d] float32.
  """
  rows, m = weights.shape
  d = table.shape[1]
  weights = weights.astype(jnp.float32)
  out = jnp.zeros((rows, d), jnp.float32) if init is None else init

  def contrib(w, lat):
    return table[lat].astype(jnp.float32) * w[..., None]

  tile = _row_tile(rows, m, d)
  if tile == rows:
    if tokens is None:
      return out + jnp.sum(contrib(weights, latents), axis=1)
    return out.at[tokens.reshape(-1)].add(contrib(weights, latents).reshape(-1, d))
  w3, l3 = _tiled(weights, tile), _tiled(latents, tile)
  if tokens is None:
    def body(i, out3):
      new = _step(out3, i) + jnp.sum(contrib(_step(w3, i), _step(l3, i)), axis=1)
      return lax.dynamic_update_index_in_dim(out3, new, i, axis=1)
    return lax.fori_loop(0, rows // tile, body, _tiled(out, tile)).reshape(rows, d)
  t3 = _tiled(tokens, tile)

  def body_tokens(i, out):
    c = contrib(_step(w3, i), _step(l3, i)).reshape(-1, d)
    return out.at[_step(t3, i).reshape(-1)].add(c)

  return lax.fori_loop(0, rows // tile, body_tokens, out)


def _scatter_rows(weights, latents, source, tokens, n, init=None):
  """out[latents[r, j]] += weights[r, j] * source[tokens[r, j] or r].

  Args:
    weights: [R, m] float.
    latents: [R, m] int32 destination rows in [0, n).
    source: [R, d] rows to scatter.
    tokens: None or [R, m] int32 rows of `source`.
    n: number of output rows.
    init: optional [n, d] float32 to accumulate into (default zeros).

  Returns:
    [n, d] float32.
  """
  rows, m = weights.shape
  d = source.shape[1]
  weights = weights.astype(jnp.float32)
  source = source.astype(jnp.float32)
  out = jnp.zeros((n, d), jnp.float32) if init is None else init

  def add(out, w, lat, src):  # src: [t, d] (row r's) or [t, m, d]
    if src.ndim == 2:
      src = src[:, None, :]
    return out.at[lat.reshape(-1)].add((src * w[..., None]).reshape(-1, d))

  tile = _row_tile(rows, m, d)
  if tile == rows:
    return add(out, weights, latents, source if tokens is None else source[tokens])
  w3, l3 = _tiled(weights, tile), _tiled(latents, tile)
  src3 = _tiled(source, tile) if tokens is None else None
  t3 = None if tokens is None else _tiled(tokens, tile)

  def body(i, out):
    src = _step(src3, i) if tokens is None else source[_step(t3, i)]
    return add(out, _step(w3, i), _step(l3, i), src)

  return lax.fori_loop(0, rows // tile, body, out)


def _row_dots(rows_src, latents, table, tokens):
  """out[r, j] = <rows_src[tokens[r, j] or r], table[latents[r, j]]>, [R, m] float32."""
  rows, m = latents.shape
  rows_src = rows_src.astype(jnp.float32)

  def dots(src, lat):  # src: [t, d] (row r's) or [t, m, d]
    gathered = table[lat].astype(jnp.float32)
    if src.ndim == 2:
      # A batched matrix-vector product: about 2x faster on CPU than the
      # elementwise product and reduction XLA otherwise emits.
      return jnp.einsum('tmd,td->tm', gathered, src, preferred_element_type=jnp.float32)
    return jnp.sum(src * gathered, axis=-1)

  tile = _row_tile(rows, m, table.shape[1])
  if tile == rows:
    return dots(rows_src if tokens is None else rows_src[tokens], latents)
  l3 = _tiled(latents, tile)
  src3 = _tiled(rows_src, tile) if tokens is None else None
  t3 = None if tokens is None else _tiled(tokens, tile)

  def body(i, out3):
    src = _step(src3, i) if tokens is None else rows_src[_step(t3, i)]
    return lax.dynamic_update_index_in_dim(out3, dots(src, _step(l3, i)), i, axis=1)

  out3 = jnp.zeros((tile, rows // tile, m), jnp.float32)
  return lax.fori_loop(0, rows // tile, body, out3).reshape(rows, m)


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
    candidate_floor: float32 scalar, batch mode with per-token candidates: a
      score near rank _FLOOR_SLACK * B * k among them, at least 0
      (`candidate_floor`): a floor above which the next batch's candidates
      may be taken (see `BatchTopKSAE`).
  """
  values: jax.Array
  latents: jax.Array
  tokens: jax.Array | None
  aux_values: jax.Array
  aux_latents: jax.Array
  overflow: jax.Array
  min_score: jax.Array | None
  candidate_floor: jax.Array | None


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


def _aux_select(pre, aux_mask, aux_k):
  """Top aux_k of pre among the aux_mask latents: (values at them, latents)."""
  # An additive mask: with a constant aux_mask (no dead latent) the masked
  # scores are still not constants that XLA would try to fold at compile time.
  offset = jnp.where(aux_mask, 0.0, -jnp.inf).astype(jnp.float32)
  _, latents = top_k_rows(pre + offset, aux_k)
  return jnp.take_along_axis(pre, latents, axis=-1), latents


def _merge(run, new, k):
  """Merges two (scores, values, latents) top lists; `run` wins ties (lower indices)."""
  scores = jnp.concatenate([run[0], new[0]], axis=-1)
  _, pos = lax.top_k(scores, k)
  return tuple(jnp.take_along_axis(jnp.concatenate([a, b], axis=-1), pos, axis=-1)
               for a, b in zip(run, new))


def _zeros_selection(rows, k):
  return (jnp.zeros((rows, k), jnp.float32), jnp.zeros((rows, k), jnp.int32))


def _tile_rows(batch, width):
  """Rows per encoder tile: the largest divisor of `batch` not above
  max(_MIN_TILE_ROWS, _TILE_BYTES / (4 * width))."""
  target = max(_MIN_TILE_ROWS, _TILE_BYTES // (4 * width))
  if target >= batch:
    return batch
  return max(t for t in range(1, target + 1) if batch % t == 0)


def _select_tile(x, W_enc, b_enc, threshold, aux_mask, spec):
  """Per-token selections over one tile of rows and one block of latents.

  The bias, threshold and margin are applied inside the selection (`_top_k_of`),
  so that the only pass over the [rows, n] block is the one that reads the
  matmul's output; scores and values are those of the plain formulas
  (`preactivations`, `_scores`), bit for bit.

  Returns:
    (main, aux): main = (scores, values, latents), each [rows, k], in lax.top_k
    order; aux = (values, latents) [rows, aux_k] when aux_mask is given, else None.
  """
  dtype = jnp.dtype(spec.dtype)
  raw = jnp.dot(x.astype(dtype), W_enc.astype(dtype), preferred_element_type=jnp.float32)
  bias = b_enc.astype(jnp.float32)
  vectors = (bias,) if threshold is None else (bias, threshold.astype(jnp.float32))

  def score(r, b, *thr):
    return _scores(r + b, thr[0] if thr else None, spec)

  def pre_at(latents):
    return jnp.take_along_axis(raw, latents, axis=-1) + bias[latents]

  top_scores, latents = _top_k_of(raw, spec.k, vectors, score)
  plain = threshold is None and not spec.margin and not spec.batch_k_per_token
  main = (top_scores, top_scores if plain else pre_at(latents), latents)
  aux = None
  if aux_mask is not None:
    # An additive mask: with a constant aux_mask (no dead latent) the masked
    # scores are still not constants that XLA would try to fold at compile time.
    offset = jnp.where(aux_mask, 0.0, -jnp.inf).astype(jnp.float32)
    _, aux_latents = _top_k_of(raw, spec.aux_k, (bias, offset), lambda r, b, o: (r + b) + o)
    aux = (pre_at(aux_latents), aux_latents)
  return main, aux


def _select_row_tiles(x, W_enc, b_enc, threshold, aux_mask, spec):
  """`_select_tile` over tiles of rows, so that [B, n] never exists whole.

  Tile i holds rows i, i + T, i + 2T, ... (T tiles): x viewed as [rows, T, d]
  keeps any sharding of the batch on its leading axis, and the loop runs along
  the unsharded one.
  """
  batch, d = x.shape
  rows = _tile_rows(batch, W_enc.shape[1])
  if rows == batch:
    return _select_tile(x, W_enc, b_enc, threshold, aux_mask, spec)
  tiles = batch // rows
  x3 = x.reshape(rows, tiles, d)

  def body(i, out):
    x_tile = lax.dynamic_index_in_dim(x3, i, axis=1, keepdims=False)
    new = _select_tile(x_tile, W_enc, b_enc, threshold, aux_mask, spec)
    put = lambda buf, a: lax.dynamic_update_index_in_dim(buf, a, i, axis=1)
    return jax.tree.map(put, out, new)

  def empty(k):
    return jnp.zeros((rows, tiles, k), jnp.float32), jnp.zeros((rows, tiles, k), jnp.int32)

  main = (empty(spec.k)[0],) + empty(spec.k)
  aux = None if aux_mask is None else empty(spec.aux_k)
  main, aux = lax.fori_loop(0, tiles, body, (main, aux))
  return jax.tree.map(lambda a: a.reshape(batch, -1), (main, aux))


def _per_token_blocks(x, W_enc, b_enc, threshold, aux_mask, spec):
  """`_select_row_tiles` over blocks of spec.block_size latents (0: one block).

  The blocks' candidates are collected and selected once, or merged block by
  block when there are many (and always for AuxK, whose lists are long).
  Candidates stay in (block, rank) order, so equal scores keep the lower latent
  index, as lax.top_k does.
  """
  batch = x.shape[0]
  n = W_enc.shape[1]
  bs = spec.block_size or n
  if bs == n:
    return _select_row_tiles(x, W_enc, b_enc, threshold, aux_mask, spec)
  n_blocks = n // bs

  def block(i):
    start = i * bs
    cut = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, start, bs, axis=-1)
    main, aux = _select_row_tiles(x, cut(W_enc), cut(b_enc), cut(threshold), cut(aux_mask),
                                  spec)
    main = main[:2] + (main[2] + start,)
    if aux is not None:  # merged by their masked scores
      aux = (jnp.where(jnp.take(aux_mask, aux[1] + start), aux[0], -jnp.inf), aux[0],
             aux[1] + start)
    return main, aux

  collect = n_blocks * spec.k <= _MAX_COLLECTED
  main_run, aux_run = block(0)
  if collect:
    main_run = tuple(jnp.zeros((n_blocks,) + a.shape, a.dtype).at[0].set(a) for a in main_run)

  def body(i, carry):
    main_run, aux_run = carry
    main, aux = block(i)
    if collect:
      main_run = tuple(lax.dynamic_update_index_in_dim(buf, a, i, axis=0)
                       for buf, a in zip(main_run, main))
    else:
      main_run = _merge(main_run, main, spec.k)
    if aux is not None:
      aux_run = _merge(aux_run, aux, spec.aux_k)
    return main_run, aux_run

  main_run, aux_run = lax.fori_loop(1, n_blocks, body, (main_run, aux_run))
  if collect:
    flat = tuple(jnp.moveaxis(a, 0, 1).reshape(batch, n_blocks * spec.k) for a in main_run)
    top_scores, pos = top_k_rows(flat[0], spec.k)
    main_run = (top_scores,) + tuple(jnp.take_along_axis(a, pos, axis=-1) for a in flat[1:])
  return main_run, (None if aux_run is None else aux_run[1:])


def _per_token_select(x, W_enc, b_enc, threshold, aux_mask, spec):
  """Per-token top spec.k, and the AuxK top spec.aux_k among aux_mask latents.

  The AuxK selection costs as much as the main one, so it runs only when more
  than spec.aux_min_dead latents are in aux_mask; otherwise its values and
  indices are zeros. The choice is made once, around the whole pass.

  Returns:
    (main, aux): main = (scores, values, latents) [B, k]; aux = (values,
    latents) [B, aux_k] or None when spec.aux_k == 0.
  """
  args = (x, W_enc, b_enc, threshold)
  if not spec.aux_k:
    return _per_token_blocks(*args, None, spec)
  batch = x.shape[0]

  def without_aux():
    main, _ = _per_token_blocks(*args, None, spec)
    return main, _zeros_selection(batch, spec.aux_k)

  return lax.cond(jnp.sum(aux_mask) > spec.aux_min_dead,
                  lambda: _per_token_blocks(*args, aux_mask, spec), without_aux)


def _exhaustive_batch_select(pre, spec):
  """BatchTopK over the whole flattened [B, n] matrix (the exact reference)."""
  batch, n = pre.shape
  total = batch * spec.batch_k_per_token
  _, pos = lax.top_k(jnp.maximum(pre, 0.0).reshape(-1), total)
  values = pre.reshape(-1)[pos]
  return values, (pos % n).astype(jnp.int32), (pos // n).astype(jnp.int32)


def _sortable_keys(values):
  """int32 keys with the order of the float32 values (-0.0 counted as +0.0)."""
  bits = lax.bitcast_convert_type(values.astype(jnp.float32) + 0.0, jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _kth_largest_key(keys, count):
  """The count-th largest entry of the int32 `keys` (any shape), by bisection.

  32 halvings of [min, max], each counting the entries >= the midpoint: a few
  vectorised passes instead of a top-k with a heap of `count` entries.
  """
  lo, hi = jnp.min(keys), jnp.max(keys)

  def body(_, bounds):
    lo, hi = bounds
    # ceil((lo + hi) / 2) without overflowing int32: lo < mid <= hi when lo < hi.
    mid = (lo >> 1) + (hi >> 1) + (((lo & 1) + (hi & 1) + 1) >> 1)
    enough = jnp.sum(keys >= mid) >= count
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

  return lax.fori_loop(0, 32, body, (lo, hi))[0]


def score_near_rank(scores, rank):
  """About the rank-th largest (0-based) of `scores` (any shape).

  Sorts a strided sample of at most _RANK_SAMPLE entries (stride s, odd): an
  estimate whose true rank is off by about sqrt(rank * s) for scores in no
  particular order, at a few milliseconds where an exact selection among
  millions would cost a top-k or a bisection (callers need only a rough floor:
  exactness is checked elsewhere).
  When `rank` is past the last sampled entry, returns the smallest sampled.
  """
  flat = scores.reshape(-1)
  # An odd stride: rows of sorted candidates (a power-of-two length) are then
  # sampled at every rank, not at the top of each run of `stride`.
  stride = max(1, flat.shape[0] // _RANK_SAMPLE) | 1
  sample = jnp.sort(flat[::stride])
  return sample[sample.shape[0] - 1 - min(sample.shape[0] - 1, rank // stride)]


def candidate_floor(scores, total, floor=0.0):
  """A floor for the next batch's candidates: about the _FLOOR_SLACK * total-th
  largest of `scores`, and at least `floor` (the floor `scores` were taken
  above, if any: fewer candidates than that rank keep it) and 0."""
  return jnp.maximum(score_near_rank(scores, _FLOOR_SLACK * total), jnp.maximum(floor, 0.0))


def _batch_select(main, pre, x, W_enc, b_enc, spec):
  """Keeps B * k_per_token entries across the batch from per-token candidates.

  Each token's candidates are its top c scores in rank order (ties by latent
  index). The flat top-k over them is found without sorting: the kept entries
  are those above the (B * k)-th largest candidate score t, then those equal to
  t in token-major order (the exhaustive selection's tie rule), so each token
  keeps a prefix of its candidates. The output lists the kept triples token by
  token, each in rank order. The candidates are exact unless some token kept
  all c of them with a positive last one (it might have had more); then the
  exhaustive selection runs, on `pre` when the caller has it, else recomputing it.
  """
  batch = x.shape[0]
  cand_scores, cand_values, cand_latents = main
  c = cand_scores.shape[1]
  total = batch * spec.batch_k_per_token
  keys = _sortable_keys(cand_scores)
  t = _kth_largest_key(keys, total)
  above = jnp.sum(keys > t, axis=1, dtype=jnp.int32)
  ties = jnp.sum(keys == t, axis=1, dtype=jnp.int32)
  ties_before = jnp.cumsum(ties) - ties
  kept = above + jnp.clip(total - jnp.sum(above) - ties_before, 0, ties)
  overflow = jnp.any((kept == c) & (cand_scores[:, c - 1] > 0))
  # Output slot j holds token b's candidate j - start[b], where start is the
  # exclusive running count of kept entries.
  start = jnp.cumsum(kept) - kept
  slots = jnp.arange(total, dtype=jnp.int32)
  tokens = (jnp.searchsorted(start, slots, side='right') - 1).astype(jnp.int32)
  flat = tokens * c + (slots - start[tokens])
  fast = (cand_values.reshape(-1)[flat], cand_latents.reshape(-1)[flat], tokens)

  def exhaustive():
    full = preactivations(x, W_enc, b_enc, spec.dtype) if pre is None else pre
    return _exhaustive_batch_select(full, spec)

  values, latents, tokens = lax.cond(overflow, exhaustive, lambda: fast)
  shape = (batch, spec.batch_k_per_token)
  return (values.reshape(shape), latents.reshape(shape), tokens.reshape(shape), overflow,
          candidate_floor(cand_scores, total))


def _encode_forward(spec, x, W_enc, b_enc, threshold, aux_mask):
  batch = x.shape[0]
  overflow = jnp.asarray(False)
  min_score = floor = None
  aux = None
  if spec.batch_k_per_token and not spec.k:
    # Exhaustive BatchTopK: the whole [B, n] matrix is the candidate set.
    pre = preactivations(x, W_enc, b_enc, spec.dtype)
    if spec.aux_k:
      aux = lax.cond(jnp.sum(aux_mask) > spec.aux_min_dead,
                     lambda p: _aux_select(p, aux_mask, spec.aux_k),
                     lambda p: _zeros_selection(batch, spec.aux_k), pre)
    values, latents, tokens = _exhaustive_batch_select(pre, spec)
    shape = (batch, spec.batch_k_per_token)
    values, latents, tokens = (a.reshape(shape) for a in (values, latents, tokens))
  else:
    main, aux = _per_token_select(x, W_enc, b_enc, threshold, aux_mask, spec)
    if spec.batch_k_per_token:
      values, latents, tokens, overflow, floor = _batch_select(main, None, x, W_enc, b_enc,
                                                               spec)
    else:
      top_scores, values, latents = main
      tokens = None
      min_score = jnp.min(top_scores, axis=-1)
  if aux is None:
    aux = (jnp.zeros((batch, 0), jnp.float32), jnp.zeros((batch, 0), jnp.int32))
  return EncoderOutput(values, latents, tokens, aux[0], aux[1], overflow, min_score, floor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _encode(spec, x, W_enc, b_enc, threshold, aux_mask):
  return _encode_forward(spec, x, W_enc, b_enc, threshold, aux_mask)


def _encode_fwd(spec, x, W_enc, b_enc, threshold, aux_mask):
  out = _encode_forward(spec, x, W_enc, b_enc, threshold, aux_mask)
  # Residuals: the inputs and the indices; never the [B, n] pre-activations.
  res = (x, W_enc, b_enc, out.latents, out.tokens, out.aux_latents)
  return out, res


def _encoder_grads(x, W_enc, g, latents, tokens, init=None):
  """(d_x, d_W_enc^T, d_b_enc) in float32 for cotangents g at the selected entries,
  added to `init` (a tuple of the three) when given."""
  n = W_enc.shape[1]
  if init is None:
    # Zeros made as a flat vector: XLA would otherwise merge them with the
    # decoder's equal zeros and copy that buffer into each accumulator.
    d = x.shape[1]
    init = (None, jnp.zeros((n * d,), jnp.float32).reshape(n, d), jnp.zeros((n,), jnp.float32))
  # d_x gathers columns of W_enc; callers that do not use d_x (the SAEs route
  # b_dec's gradient elsewhere) let XLA drop this loop and the transpose.
  W_enc_t = lax.optimization_barrier(W_enc.T)
  d_x = _weighted_row_sum(g, latents, W_enc_t, tokens, init[0])
  d_w_t = _scatter_rows(g, latents, x, tokens, n, init[1])
  d_b = init[2].at[latents.reshape(-1)].add(g.reshape(-1).astype(jnp.float32))
  return d_x, d_w_t, d_b


def _encode_bwd(spec, res, ct):
  del spec
  x, W_enc, b_enc, latents, tokens, aux_latents = res
  # A zero cotangent (the selection fed only an untaken branch, as in the ReLU
  # SAEs' dense fallback) skips the scatter loops.
  grads = lax.cond(jnp.any(ct.values != 0),
                   lambda: _encoder_grads(x, W_enc, ct.values, latents, tokens),
                   lambda: (jnp.zeros(x.shape, jnp.float32),
                            jnp.zeros(W_enc.shape[::-1], jnp.float32),
                            jnp.zeros(b_enc.shape, jnp.float32)))
  if aux_latents.shape[1]:
    # The AuxK cotangent is exactly zero when no latent is dead: skip its loops,
    # passing the gradients through (no zero arrays to add).
    # (Opaque to XLA: a constant zero cotangent would be folded at length.)
    g_aux = lax.optimization_barrier(ct.aux_values)
    grads = lax.cond(jnp.any(g_aux != 0),
                     lambda acc: _encoder_grads(x, W_enc, g_aux, aux_latents, None, acc),
                     lambda acc: acc, grads)
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
