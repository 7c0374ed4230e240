"""The sparse decoder with its custom VJP, and small helpers over sparse activations."""
import functools

import jax
import jax.numpy as jnp

from dictlearn.sae.sparse import rows as rows_lib
from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import KernelTuning


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_decode(tuning, values, latents, W_dec, tokens):
  return rows_lib.weighted_row_sum(values, latents, W_dec, tokens, tuning=tuning)


def _sparse_decode_fwd(tuning, values, latents, W_dec, tokens):
  out = rows_lib.weighted_row_sum(values, latents, W_dec, tokens, tuning=tuning)
  return out, (values, latents, W_dec, tokens)


def _sparse_decode_bwd(tuning, res, g):
  values, latents, W_dec, tokens = res
  d_values = rows_lib.row_dots(g, latents, W_dec, tokens, tuning).astype(values.dtype)
  d_W_dec = rows_lib.scatter_rows(values, latents, g, tokens, W_dec.shape[0], tuning=tuning)
  return d_values, None, d_W_dec.astype(W_dec.dtype), None


_sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def sparse_decode(values, latents, W_dec, tokens=None, tuning: KernelTuning = DEFAULT_TUNING):
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
    tuning: the row loops' step size.

  Returns:
    [B, d] float32.
  """
  return _sparse_decode(tuning, values, latents.astype(jnp.int32), W_dec,
                        None if tokens is None else tokens.astype(jnp.int32))


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
