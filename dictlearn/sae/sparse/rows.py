"""Row gathers and scatters over selected (token, latent) entries.

The decoder, its backward and the encoder's backward all follow only the
selected entries: each is a gather or a scatter-add of rows of a [n, d] table
(W_dec, or W_enc transposed) at the selected latents. They run as loops over
steps of rows, each step one vectorised op over [rows, m, d] elements (at most
`KernelTuning.vectorize_max_elements`): XLA runs the scatter-adds in place, and
small problems take a single step.

Entries come as [R, m] arrays: entry [r, j] belongs to row r (per-token
selections), or with `tokens` to row tokens[r, j] (flat triples laid out in R
rows, as BatchTopK and the capacity selection produce them). The loops run
along an unsharded axis, so the same code serves a batch sharded over devices.
"""
import jax.numpy as jnp
from jax import lax

from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import KernelTuning
from dictlearn.sae.sparse.tuning import divisor_at_most


def row_tile(rows: int, m: int, d: int, tuning: KernelTuning = DEFAULT_TUNING) -> int:
  """Rows of entries handled per step of the row loops.

  A step gathers or scatters [tile, m, d] elements as one vectorised op; the
  largest divisor of `rows` that keeps this within `vectorize_max_elements`
  (all rows at once for small problems, where a loop's per-step cost would
  dominate).
  """
  return divisor_at_most(rows, max(1, tuning.vectorize_max_elements // max(1, m * d)))


def tiled(a, tile):
  """[R, ...] -> [tile, R // tile, ...]: step i takes rows i, i + T, ... (T steps).

  The leading axis keeps any sharding of the rows; loops run along axis 1."""
  return a.reshape(tile, a.shape[0] // tile, *a.shape[1:])


def step_of(a, i):
  """Step i of a `tiled` array."""
  return lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False)


def weighted_row_sum(weights, latents, table, tokens, init=None,
                     tuning: KernelTuning = DEFAULT_TUNING):
  """out[r] += weights[r, j] * table[latents[r, j]] (into row tokens[r, j] if given).

  Args:
    weights: [R, m] float.
    latents: [R, m] int32 rows of `table`.
    table: [n, d].
    tokens: None (entry [r, j] belongs to row r) or [R, m] int32 output rows.
    init: optional [R, d] float32 to accumulate into (default zeros).
    tuning: the loop's step size.

  Returns:
    [R, d] float32.
  """
  rows, m = weights.shape
  d = table.shape[1]
  weights = weights.astype(jnp.float32)
  out = jnp.zeros((rows, d), jnp.float32) if init is None else init

  def contrib(w, lat):
    return table[lat].astype(jnp.float32) * w[..., None]

  tile = row_tile(rows, m, d, tuning)
  if tile == rows:
    if tokens is None:
      return out + jnp.sum(contrib(weights, latents), axis=1)
    return out.at[tokens.reshape(-1)].add(contrib(weights, latents).reshape(-1, d))
  w3, l3 = tiled(weights, tile), tiled(latents, tile)
  if tokens is None:
    def body(i, out3):
      new = step_of(out3, i) + jnp.sum(contrib(step_of(w3, i), step_of(l3, i)), axis=1)
      return lax.dynamic_update_index_in_dim(out3, new, i, axis=1)
    return lax.fori_loop(0, rows // tile, body, tiled(out, tile)).reshape(rows, d)
  t3 = tiled(tokens, tile)

  def body_tokens(i, out):
    c = contrib(step_of(w3, i), step_of(l3, i)).reshape(-1, d)
    return out.at[step_of(t3, i).reshape(-1)].add(c)

  return lax.fori_loop(0, rows // tile, body_tokens, out)


def scatter_rows(weights, latents, source, tokens, n, init=None,
                 tuning: KernelTuning = DEFAULT_TUNING):
  """out[latents[r, j]] += weights[r, j] * source[tokens[r, j] or r].

  Args:
    weights: [R, m] float.
    latents: [R, m] int32 destination rows in [0, n).
    source: [R, d] rows to scatter.
    tokens: None or [R, m] int32 rows of `source`.
    n: number of output rows.
    init: optional [n, d] float32 to accumulate into (default zeros).
    tuning: the loop's step size.

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

  tile = row_tile(rows, m, d, tuning)
  if tile == rows:
    return add(out, weights, latents, source if tokens is None else source[tokens])
  w3, l3 = tiled(weights, tile), tiled(latents, tile)
  src3 = tiled(source, tile) if tokens is None else None
  t3 = None if tokens is None else tiled(tokens, tile)

  def body(i, out):
    src = step_of(src3, i) if tokens is None else source[step_of(t3, i)]
    return add(out, step_of(w3, i), step_of(l3, i), src)

  return lax.fori_loop(0, rows // tile, body, out)


def row_dots(rows_src, latents, table, tokens, tuning: KernelTuning = DEFAULT_TUNING):
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

  tile = row_tile(rows, m, table.shape[1], tuning)
  if tile == rows:
    return dots(rows_src if tokens is None else rows_src[tokens], latents)
  l3 = tiled(latents, tile)
  src3 = tiled(rows_src, tile) if tokens is None else None
  t3 = None if tokens is None else tiled(tokens, tile)

  def body(i, out3):
    src = step_of(src3, i) if tokens is None else rows_src[step_of(t3, i)]
    return lax.dynamic_update_index_in_dim(out3, dots(src, step_of(l3, i)), i, axis=1)

  out3 = jnp.zeros((tile, rows // tile, m), jnp.float32)
  return lax.fori_loop(0, rows // tile, body, out3).reshape(rows, m)
