"""The reconstruction terms of TopK and BatchTopK with their gradients, fused.

`topk_mse`: TopK's term in one pass per tile of rows, its gradient included.

With a per-token selection everything a token's error depends on is in its own
row, so the whole term runs tile by tile: the encoder matmul and top-k of a
tile of rows (`per_token.select_tile`), then, in steps of a few rows, one
gather of the selected W_dec rows serving the decode, the error, the squared
error and the activations' gradient, and the scatter-adds of the decoder's and
the encoder's gradients into their [n, d] accumulators. Compared with a
selection followed by `sparse_decode` and the two VJPs, the W_dec rows are
gathered once instead of twice, and no pass over the selection is repeated.

`batch_mse`: the same term for flat (token, latent) triples selected
beforehand (BatchTopK): one pass decodes, then one pass per step of entries
gathers the W_dec rows, the error rows and the input rows once each for the
activations' gradient and both scatter-adds. The triples are sorted by latent
first (one int32 sort), so that the scatter-adds into the [n, d] gradients
and the W_dec gathers walk the tables in order instead of at random.

Both are custom VJPs whose forward computes the gradient (the `fwd` rule:
nothing is saved but the gradients themselves) and whose backward scales it
by the cotangent of the squared error; without differentiation the same pass
runs without the gradient. The selection is `encode_select`'s (the
same tie rule, the same AuxK selection), and every value and gradient equals
the dense formulation's (tests/test_kernels.py).

    x_in = x - b_dec     pre = x_in @ W_enc + b_enc     (values, latents) = top_k(pre)
    x_hat = sum_j relu(values_j) W_dec[latents_j] + b_dec
    mse = sum ||x_hat - x||^2 / B
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dictlearn.sae.sparse import per_token
from dictlearn.sae.sparse import rows as rows_lib
from dictlearn.sae.sparse.spec import AuxSelection
from dictlearn.sae.sparse.spec import EncoderSpec
from dictlearn.sae.sparse.spec import check_spec
from dictlearn.sae.sparse.spec import no_aux_selection
from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import KernelTuning
from dictlearn.sae.sparse.tuning import tile_rows


class TopKTerm(NamedTuple):
  """The TopK reconstruction term and what the rest of the loss needs.

  Attributes:
    mse: scalar, sum ||x - x_hat||^2 / B (the only differentiable field).
    x_hat: [B, d] float32 reconstruction.
    values: [B, k] float32 pre-activations of the selected latents (no ReLU).
    latents: [B, k] int32 selected latents, in lax.top_k order.
    aux: AuxSelection [B, aux_k] (zeros when skipped, [B, 0] without AuxK).
  """
  mse: jax.Array
  x_hat: jax.Array
  values: jax.Array
  latents: jax.Array
  aux: AuxSelection


class _Grads(NamedTuple):
  """Accumulators of the gradients, float32."""
  W_dec: jax.Array  # [n, d]
  W_enc_t: jax.Array  # [n, d]: W_enc's gradient transposed (the scatter writes rows)
  b_enc: jax.Array  # [n]
  g_sum: jax.Array  # [d]: sum over tokens of d mse / d x_hat (b_dec's decoder side)


def _zero_grads(n, d):
  # Zeros made as flat vectors: XLA would otherwise merge equal zeros into one
  # buffer and copy it into each accumulator.
  zeros = lambda: jnp.zeros((n * d,), jnp.float32).reshape(n, d)
  return _Grads(zeros(), zeros(), jnp.zeros((n,), jnp.float32), jnp.zeros((d,), jnp.float32))


def _rows_step(x_r, x_in_r, values, latents, W_dec, b_dec, scale, grads):
  """Decode, error and (when `grads` is given) gradients of a few rows.

  Args:
    x_r, x_in_r: [S, d] float32 rows of x and x - b_dec.
    values, latents: [S, k] selection of those rows.
    W_dec: [n, d]; b_dec: [d] float32.
    scale: 2 / B, d mse / d x_hat per unit of error.
    grads: _Grads to add to, or None.

  Returns:
    (x_hat [S, d], squared error scalar, grads).
  """
  dec = W_dec[latents].astype(jnp.float32)  # [S, k, d], gathered once
  acts = jnp.maximum(values, 0.0)
  x_hat = jnp.einsum('skd,sk->sd', dec, acts, preferred_element_type=jnp.float32) + b_dec
  err = x_hat - x_r
  sq = jnp.sum(err * err)
  if grads is None:
    return x_hat, sq, None
  g = scale * err
  d_acts = jnp.einsum('skd,sd->sk', dec, g, preferred_element_type=jnp.float32)
  d_values = jnp.where(values > 0, d_acts, 0.0)
  flat = latents.reshape(-1)
  d = x_r.shape[1]
  grads = _Grads(
      grads.W_dec.at[flat].add((acts[..., None] * g[:, None, :]).reshape(-1, d)),
      grads.W_enc_t.at[flat].add((d_values[..., None] * x_in_r[:, None, :]).reshape(-1, d)),
      grads.b_enc.at[flat].add(d_values.reshape(-1)),
      grads.g_sum + jnp.sum(g, axis=0))
  return x_hat, sq, grads


def _pass(spec, x, W_enc, b_enc, W_dec, b_dec, aux_mask, with_grads):
  """The whole term (and its gradient wrt W_enc, b_enc, W_dec, b_dec when asked)."""
  batch, d = x.shape
  n, k = W_enc.shape[1], spec.k
  aux_k = spec.aux_k if aux_mask is not None else 0
  b_dec32 = b_dec.astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  x_in = x32 - b_dec32
  rows = tile_rows(batch, n, spec.tuning)
  tiles = batch // rows
  step = rows_lib.row_tile(rows, k, d, spec.tuning)
  steps = rows // step
  scale = jnp.float32(2.0 / batch)
  # Token b = r * tiles + i is row r of tile i (x viewed as [rows, tiles, d]);
  # row r = p * steps + j is row p of step j of its tile.
  view = lambda a: a.reshape(step, steps, tiles, *a.shape[1:])
  x5, x_in5 = view(x32), view(x_in)

  def select(i):
    x_tile = lax.dynamic_index_in_dim(x_in.reshape(rows, tiles, d), i, axis=1, keepdims=False)
    main, aux = per_token.select_tile(x_tile, W_enc, b_enc, None, aux_mask, spec)
    aux = (None if aux is None else AuxSelection(aux.values, aux.latents))
    return (main.values, main.latents), aux

  def put(buf, a, j, i):  # a: [step, ...] at step j of tile i
    return lax.dynamic_update_slice(buf, a[:, None, None],
                                    (0, j, i) + (0,) * (buf.ndim - 3))

  def work(i, selection, acc):
    """The sparse work of tile i, step by step."""
    values, latents = (a.reshape(step, steps, k) for a in selection)

    def body(j, acc):
      out_x_hat, sq, grads = acc
      at = lambda a: lax.dynamic_slice(a, (0, j, i, 0), (step, 1, 1, d)).reshape(step, d)
      v = lax.dynamic_index_in_dim(values, j, axis=1, keepdims=False)
      lat = lax.dynamic_index_in_dim(latents, j, axis=1, keepdims=False)
      x_hat, part, grads = _rows_step(at(x5), at(x_in5), v, lat, W_dec, b_dec32, scale, grads)
      return put(out_x_hat, x_hat, j, i), sq + part, grads

    return lax.fori_loop(0, steps, body, acc)

  def keep(out, selection, aux, i):
    """Stores tile i's selection (and AuxK selection) into the [rows, tiles, .] outputs."""
    (out_values, out_latents), out_aux = out
    at = lambda buf, a: lax.dynamic_update_index_in_dim(buf, a, i, axis=1)
    out_aux = None if aux is None else AuxSelection(at(out_aux.values, aux.values),
                                                    at(out_aux.latents, aux.latents))
    return (at(out_values, selection[0]), at(out_latents, selection[1])), out_aux

  empty = lambda m, dtype: jnp.zeros((rows, tiles, m), dtype)
  out = ((empty(k, jnp.float32), empty(k, jnp.int32)),
         None if not aux_k else AuxSelection(empty(aux_k, jnp.float32), empty(aux_k, jnp.int32)))
  acc = (jnp.zeros((step, steps, tiles, d), jnp.float32), jnp.zeros((), jnp.float32),
         _zero_grads(n, d) if with_grads else None)

  def tile(i, carry):
    out, acc = carry
    selection, aux = select(i)
    return keep(out, selection, aux, i), work(i, selection, acc)

  out, (x_hat, sq, grads) = lax.fori_loop(0, tiles, tile, (out, acc))
  (values, latents), aux = out
  flat = lambda a: a.reshape(batch, -1)
  term = TopKTerm(sq / batch, x_hat.reshape(batch, d), flat(values), flat(latents),
                  no_aux_selection(batch, 0) if aux is None
                  else AuxSelection(flat(aux.values), flat(aux.latents)))
  if grads is None:
    return term, None
  # b_dec enters through x_in = x - b_dec too: -W_enc @ (d mse / d b_enc).
  d_b_dec = grads.g_sum - jnp.dot(W_enc.astype(jnp.float32), grads.b_enc)
  return term, (grads.W_enc_t.T, grads.b_enc, grads.W_dec, d_b_dec)


def _term(spec, x, W_enc, b_enc, W_dec, b_dec, aux_mask, with_grads):
  """`_pass`, with the AuxK selection made only when more than aux_min_dead are dead."""
  if not spec.aux_k:
    return _pass(spec, x, W_enc, b_enc, W_dec, b_dec, None, with_grads)
  batch = x.shape[0]

  def without_aux():
    term, grads = _pass(spec, x, W_enc, b_enc, W_dec, b_dec, None, with_grads)
    return term._replace(aux=no_aux_selection(batch, spec.aux_k)), grads

  return lax.cond(jnp.sum(aux_mask) > spec.aux_min_dead,
                  lambda: _pass(spec, x, W_enc, b_enc, W_dec, b_dec, aux_mask, with_grads),
                  without_aux)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _topk_mse(spec, x, W_enc, b_enc, W_dec, b_dec, aux_mask):
  return _term(spec, x, W_enc, b_enc, W_dec, b_dec, aux_mask, False)[0]


def _topk_mse_fwd(spec, x, W_enc, b_enc, W_dec, b_dec, aux_mask):
  term, grads = _term(spec, x, W_enc, b_enc, W_dec, b_dec, aux_mask, True)
  return term, (grads, (W_enc, b_enc, W_dec, b_dec))


def _topk_mse_bwd(spec, res, ct):
  del spec
  grads, params = res
  return (None,) + tuple((ct.mse * g).astype(p.dtype) for g, p in zip(grads, params)) + (None,)


_topk_mse.defvjp(_topk_mse_fwd, _topk_mse_bwd)


def topk_mse(x, W_enc, b_enc, W_dec, b_dec, spec: EncoderSpec, *, aux_mask=None) -> TopKTerm:
  """TopK's squared error term in one pass per tile, differentiable in `mse` only.

  Args:
    x: [B, d] batch (no gradient).
    W_enc: [d, n]; b_enc: [n]; W_dec: [n, d]; b_dec: [d].
    spec: EncoderSpec in per-token mode with one block (block_size 0 or n);
      AuxK's selection as in `encode_select`.
    aux_mask: [n] bool, required when spec.aux_k > 0.

  Returns:
    TopKTerm; its other fields carry no gradient.

  Raises:
    ValueError: a batch-mode or blocked spec, or an inconsistent one.
  """
  n = W_enc.shape[1]
  check_spec(spec, n, threshold=None, aux_mask=aux_mask)
  if spec.batch_k_per_token or spec.margin or spec.block_size not in (0, n):
    raise ValueError(f'topk_mse takes a per-token spec with one block, got {spec}')
  term = _topk_mse(spec, x, W_enc, b_enc, W_dec, b_dec, aux_mask if spec.aux_k else None)
  rest = lax.stop_gradient(term[1:])
  return TopKTerm(term.mse, *rest)


# ---------------------------------------------------------------------------
# A selection made beforehand (BatchTopK's flat triples)
# ---------------------------------------------------------------------------


def _batch_pass(tuning, x, W_enc, W_dec, b_dec, values, latents, tokens, with_grads):
  batch, d = x.shape
  n = W_dec.shape[0]
  b_dec32 = b_dec.astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  acts = jnp.maximum(values, 0.0)
  x_hat = rows_lib.weighted_row_sum(acts, latents, W_dec, tokens, tuning=tuning) + b_dec32
  err = x_hat - x32
  mse = jnp.sum(err * err) / batch
  if not with_grads:
    return (mse, x_hat), None
  g = (2.0 / batch) * err
  x_in = x32 - b_dec32
  rows, m = values.shape
  step = rows_lib.row_tile(rows, m, d, tuning)
  tiled = lambda a: rows_lib.tiled(a, step)
  v3, l3, t3 = tiled(values), tiled(latents), tiled(tokens)

  def body(i, grads):
    v, lat, tok = (rows_lib.step_of(a, i) for a in (v3, l3, t3))
    dec = W_dec[lat].astype(jnp.float32)  # [S, m, d], each gathered once
    g_rows, x_rows = g[tok], x_in[tok]
    d_values = jnp.where(v > 0, jnp.sum(dec * g_rows, axis=-1), 0.0)
    flat = lat.reshape(-1)
    return _Grads(
        grads.W_dec.at[flat].add((jnp.maximum(v, 0.0)[..., None] * g_rows).reshape(-1, d)),
        grads.W_enc_t.at[flat].add((d_values[..., None] * x_rows).reshape(-1, d)),
        grads.b_enc.at[flat].add(d_values.reshape(-1)),
        grads.g_sum)

  grads = lax.fori_loop(0, rows // step, body, _zero_grads(n, d))
  d_b_dec = jnp.sum(g, axis=0) - jnp.dot(W_enc.astype(jnp.float32), grads.b_enc)
  return (mse, x_hat), (grads.W_enc_t.T, grads.b_enc, grads.W_dec, d_b_dec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batch_mse(tuning, x, W_enc, b_enc, W_dec, b_dec, values, latents, tokens):
  del b_enc
  return _batch_pass(tuning, x, W_enc, W_dec, b_dec, values, latents, tokens, False)[0]


def _batch_mse_fwd(tuning, x, W_enc, b_enc, W_dec, b_dec, values, latents, tokens):
  out, grads = _batch_pass(tuning, x, W_enc, W_dec, b_dec, values, latents, tokens, True)
  return out, (grads, (W_enc, b_enc, W_dec, b_dec))


def _batch_mse_bwd(tuning, res, ct):
  del tuning
  grads, params = res
  ct_mse = ct[0]
  return ((None,) + tuple((ct_mse * g).astype(p.dtype) for g, p in zip(grads, params))
          + (None, None, None))


_batch_mse.defvjp(_batch_mse_fwd, _batch_mse_bwd)


def _by_latent(kept, n, blocks):
  """`kept`'s triples reordered by latent, within each of `blocks` blocks of rows.

  One sort of a packed int32 key per block, (latent << b) | position, whose
  low bits give the order back (5 ms for 131,072 triples, against 27 ms for an
  argsort); where latent and position need more than 31 bits, latents are
  sorted in buckets of 2^c (consecutive rows of the [n, d] tables).
  """
  rows, m = kept.values.shape
  blocks = math.gcd(rows, max(1, blocks))
  size = rows * m // blocks
  position_bits = max(1, (size - 1).bit_length())
  bucket_bits = max(0, max(1, (n - 1).bit_length()) + position_bits - 31)
  latents = kept.latents.astype(jnp.int32).reshape(blocks, size)
  key = (latents >> bucket_bits) << position_bits | jnp.arange(size, dtype=jnp.int32)
  order = lax.sort(key, dimension=1) & ((1 << position_bits) - 1)
  return type(kept)(*(jnp.take_along_axis(a.reshape(blocks, size), order, axis=1)
                      .reshape(rows, m) for a in kept))


def batch_mse(x, W_enc, b_enc, W_dec, b_dec, kept, tuning: KernelTuning = DEFAULT_TUNING):
  """The squared error term of flat (token, latent) triples selected beforehand.

      x_hat[t] = sum over the entries of token t of relu(value) W_dec[latent] + b_dec
      mse = sum ||x_hat - x||^2 / B

  The values must be the entries of (x - b_dec) @ W_enc + b_enc (selected
  without gradient): the gradient wrt W_enc, b_enc, W_dec and b_dec is that of
  the term as a function of the parameters, the selection held fixed (b_dec
  also through x - b_dec).

  Args:
    x: [B, d] batch (no gradient).
    W_enc: [d, n]; b_enc: [n]; W_dec: [n, d]; b_dec: [d].
    kept: NamedTuple of values [R, m] float32, latents and tokens [R, m] int32
      (`batch.Kept`), in any order (they are sorted by latent here, in
      `tuning.sort_row_blocks` blocks of rows); entries with value <= 0 (or
      -inf) contribute nothing.
    tuning: the row loops' step size and the sort's blocks.

  Returns:
    (mse scalar, differentiable; x_hat [B, d] float32, no gradient).
  """
  kept = _by_latent(kept, W_dec.shape[0], tuning.sort_row_blocks)
  mse, x_hat = _batch_mse(tuning, x, W_enc, b_enc, W_dec, b_dec,
                          lax.stop_gradient(kept.values), kept.latents.astype(jnp.int32),
                          kept.tokens.astype(jnp.int32))
  return mse, lax.stop_gradient(x_hat)
