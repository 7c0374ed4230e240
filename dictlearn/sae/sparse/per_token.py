"""Per-token selection: the encoder matmul over tiles and blocks, selecting as it goes.

The [B, n] pre-activation matrix never exists whole: the encoder runs over
tiles of rows (about `KernelTuning.tile_bytes` of pre-activations each) and,
with `block_size > 0`, over blocks of latents, keeping each token's top
entries (`rank.scored_top_k`) and, for AuxK, its top entries among a mask of
latents. Scores and values are bit-identical to those of the plain formulas
(`spec.preactivations`, `scores`), and ties keep the lower latent, so every
tiling selects what one lax.top_k over the whole matrix selects.
"""
import jax
import jax.numpy as jnp
from jax import lax

from dictlearn.sae.sparse import rank
from dictlearn.sae.sparse.spec import AuxSelection
from dictlearn.sae.sparse.spec import Candidates
from dictlearn.sae.sparse.spec import EncoderSpec
from dictlearn.sae.sparse.spec import no_aux_selection
from dictlearn.sae.sparse.tuning import tile_rows


def scores(pre, threshold, spec: EncoderSpec):
  """The selection scores of pre-activations: ReLU in batch mode, then - threshold + margin."""
  s = jnp.maximum(pre, 0.0) if spec.batch_k_per_token else pre
  if threshold is not None:
    s = s - threshold.astype(jnp.float32)
  if spec.margin:
    s = s + jnp.float32(spec.margin)
  return s


def mask_offset(aux_mask):
  """0 where aux_mask, -inf elsewhere (float32).

  An additive mask: with a constant aux_mask (no dead latent) the masked
  scores are still not constants that XLA would try to fold at compile time."""
  return jnp.where(aux_mask, 0.0, -jnp.inf).astype(jnp.float32)


def aux_select(pre, aux_mask, aux_k, tuning) -> AuxSelection:
  """Top aux_k of a dense `pre` [B, n] among the aux_mask latents."""
  _, latents = rank.top_k_rows(pre + mask_offset(aux_mask), aux_k, tuning)
  return AuxSelection(jnp.take_along_axis(pre, latents, axis=-1), latents)


def select_tile(x, W_enc, b_enc, threshold, aux_mask, spec):
  """Per-token selections over one tile of rows and one block of latents.

  The bias, threshold and margin are applied inside the selection
  (`rank.scored_top_k`), so that the only pass over the [rows, n] block is the
  one that reads the matmul's output.

  Returns:
    (main Candidates [rows, k], aux Candidates [rows, aux_k] whose scores are
    the masked pre-activations, or None without aux_mask).
  """
  dtype = jnp.dtype(spec.dtype)
  raw = jnp.dot(x.astype(dtype), W_enc.astype(dtype), preferred_element_type=jnp.float32)
  bias = b_enc.astype(jnp.float32)
  vectors = (bias,) if threshold is None else (bias, threshold.astype(jnp.float32))

  def score(r, b, *thr):
    return scores(r + b, thr[0] if thr else None, spec)

  def pre_at(latents):
    return jnp.take_along_axis(raw, latents, axis=-1) + bias[latents]

  top_scores, latents = rank.scored_top_k(raw, spec.k, vectors, score, spec.tuning)
  plain = threshold is None and not spec.margin and not spec.batch_k_per_token
  main = Candidates(top_scores, top_scores if plain else pre_at(latents), latents)
  if aux_mask is None:
    return main, None
  aux_scores, aux_latents = rank.scored_top_k(raw, spec.aux_k, (bias, mask_offset(aux_mask)),
                                              lambda r, b, o: (r + b) + o, spec.tuning)
  return main, Candidates(aux_scores, pre_at(aux_latents), aux_latents)


def _select_row_tiles(x, W_enc, b_enc, threshold, aux_mask, spec):
  """`select_tile` over tiles of rows, so that [B, n] never exists whole.

  Tile i holds rows i, i + T, i + 2T, ... (T tiles): x viewed as [rows, T, d]
  keeps any sharding of the batch on its leading axis, and the loop runs along
  the unsharded one.
  """
  batch, d = x.shape
  rows = tile_rows(batch, W_enc.shape[1], spec.tuning)
  if rows == batch:
    return select_tile(x, W_enc, b_enc, threshold, aux_mask, spec)
  tiles = batch // rows
  x3 = x.reshape(rows, tiles, d)

  def body(i, out):
    x_tile = lax.dynamic_index_in_dim(x3, i, axis=1, keepdims=False)
    new = select_tile(x_tile, W_enc, b_enc, threshold, aux_mask, spec)
    put = lambda buf, a: lax.dynamic_update_index_in_dim(buf, a, i, axis=1)
    return jax.tree.map(put, out, new)

  def empty(k):
    return Candidates(jnp.zeros((rows, tiles, k), jnp.float32),
                      jnp.zeros((rows, tiles, k), jnp.float32),
                      jnp.zeros((rows, tiles, k), jnp.int32))

  out = (empty(spec.k), None if aux_mask is None else empty(spec.aux_k))
  out = lax.fori_loop(0, tiles, body, out)
  return jax.tree.map(lambda a: a.reshape(batch, -1), out)


def _select_blocks(x, W_enc, b_enc, threshold, aux_mask, spec):
  """`_select_row_tiles` over blocks of spec.block_size latents (0: one block).

  The blocks' candidates are collected and selected once, or merged block by
  block when there are many (and always for AuxK, whose lists are long).
  Candidates stay in (block, rank) order, so equal scores keep the lower latent
  index, as lax.top_k does.

  Returns:
    (main Candidates [B, k], aux Candidates [B, aux_k] or None).
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
    return main._replace(latents=main.latents + start), (
        None if aux is None else aux._replace(latents=aux.latents + start))

  collect = n_blocks * spec.k <= spec.tuning.max_collected
  main_acc, aux_acc = block(0)
  if collect:
    main_acc = Candidates(*(jnp.zeros((n_blocks,) + a.shape, a.dtype).at[0].set(a)
                            for a in main_acc))

  def body(i, acc):
    main_acc, aux_acc = acc
    main, aux = block(i)
    if collect:
      main_acc = Candidates(*(lax.dynamic_update_index_in_dim(buf, a, i, axis=0)
                              for buf, a in zip(main_acc, main)))
    else:
      main_acc = rank.merge_top(main_acc, main, spec.k)
    if aux is not None:
      aux_acc = rank.merge_top(aux_acc, aux, spec.aux_k)
    return main_acc, aux_acc

  main_acc, aux_acc = lax.fori_loop(1, n_blocks, body, (main_acc, aux_acc))
  if collect:
    flat = Candidates(*(jnp.moveaxis(a, 0, 1).reshape(batch, n_blocks * spec.k)
                        for a in main_acc))
    _, pos = rank.top_k_rows(flat.scores, spec.k, spec.tuning)
    main_acc = Candidates(*(jnp.take_along_axis(a, pos, axis=-1) for a in flat))
  return main_acc, aux_acc


def per_token_select(x, W_enc, b_enc, threshold, aux_mask, spec: EncoderSpec):
  """Per-token top spec.k, and the AuxK top spec.aux_k among aux_mask latents.

  The AuxK selection costs as much as the main one, so it runs only when more
  than spec.aux_min_dead latents are in aux_mask; otherwise its values and
  indices are zeros. The choice is made once, around the whole pass.

  Returns:
    (main Candidates [B, k], AuxSelection [B, aux_k] or None when spec.aux_k == 0).
  """
  args = (x, W_enc, b_enc, threshold)
  if not spec.aux_k:
    return _select_blocks(*args, None, spec)[0], None
  batch = x.shape[0]

  def with_aux():
    main, aux = _select_blocks(*args, aux_mask, spec)
    return main, AuxSelection(aux.values, aux.latents)

  def without_aux():
    main, _ = _select_blocks(*args, None, spec)
    return main, no_aux_selection(batch, spec.aux_k)

  return lax.cond(jnp.sum(aux_mask) > spec.aux_min_dead, with_aux, without_aux)
