"""Reconstruction metrics of an SAE on held-out rows: FVU, MSE, L0, dead and dense latents.

FVU (fraction of variance unexplained) = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
over all evaluated rows, with the mean taken over those rows. L0 = mean number
of active latents per row. A latent is *dead* on the held-out set if it never
fires there, *dense* if it fires on more than `dense_threshold` of the rows.
Inference encoding is used (batchtopk: its learned threshold, not batch top-k).

These need only the SAE and rows, so they sit below the trainer (which
evaluates at the end of a run); `dictlearn.evals` adds the language model
(CE loss recovered) on top.
"""
from collections.abc import Iterable
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.sae import sparse
from dictlearn.sae.base import SparseAutoencoder

ROWS_PER_CALL = 1024  # bounds the dense [rows, n_latents] code held at once


@functools.partial(jax.jit, static_argnums=0)
def _reconstruction_sums(sae: SparseAutoencoder, params, buffers, x):
  acts = sae.encode(params, buffers, x)
  x_hat = sae.decode(params, acts)
  active = acts > 0
  return {
      'sum_x': jnp.sum(x, axis=0, dtype=jnp.float32),
      'sum_sq_x': jnp.sum(jnp.square(x), dtype=jnp.float32),
      'sum_sq_err': jnp.sum(jnp.square(x - x_hat), dtype=jnp.float32),
      'l0': jnp.sum(active, dtype=jnp.float32),
      'fired': sparse.batch_sum(active.astype(jnp.float32)),
  }


def evaluate_reconstruction(sae: SparseAutoencoder, params, buffers,
                            batches: Iterable, *, dense_threshold: float) -> dict:
  """FVU, MSE, L0, dead and dense fractions over `batches` of [rows, d_model].

  Args:
    sae: the architecture.
    params, buffers: its trained state.
    batches: arrays of held-out rows (already normalised like the training data).
    dense_threshold: firing rate above which a latent counts as dense.

  Returns:
    {'fvu', 'mse', 'l0', 'dead_fraction', 'dense_fraction', 'rows'}.

  Raises:
    ValueError: `batches` yields no rows.
  """
  totals, rows = None, 0
  for batch in batches:
    for chunk in _pieces(batch):
      sums = _reconstruction_sums(sae, params, buffers, chunk)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      rows += chunk.shape[0]
  if not rows:
    raise ValueError('evaluation got no held-out rows; set data.heldout_tokens > 0 '
                     'and train.eval_batches > 0')
  # The per-latent counts stay on the devices, sharded like the latents, and only
  # their fractions come back: the same code runs when they span several processes.
  dead, dense = jax.device_get(_latent_fractions(totals.pop('fired'), rows, dense_threshold))
  totals = jax.device_get(totals)  # scalars and the [d_model] sum, replicated
  mean = totals['sum_x'] / rows
  total_variance = totals['sum_sq_x'] - rows * float(np.sum(mean * mean))
  return {
      'fvu': float(totals['sum_sq_err'] / total_variance),
      'mse': float(totals['sum_sq_err'] / rows),
      'l0': float(totals['l0'] / rows),
      'dead_fraction': float(dead),
      'dense_fraction': float(dense),
      'rows': rows,
  }


@jax.jit
def _latent_fractions(fired, rows, dense_threshold):
  frequency = fired / rows
  return jnp.mean(frequency == 0), jnp.mean(frequency > dense_threshold)


def _pieces(batch):
  """A host batch in pieces of ROWS_PER_CALL rows; a sharded global batch whole (its
  rows are already spread over the devices, and may live on several processes)."""
  if isinstance(batch, jax.Array) and len(batch.sharding.device_set) > 1:
    yield batch
    return
  batch = np.asarray(batch, np.float32)
  for start in range(0, batch.shape[0], ROWS_PER_CALL):
    yield jnp.asarray(batch[start:start + ROWS_PER_CALL])
