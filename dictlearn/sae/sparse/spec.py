"""What an encoder selection is asked for and what it returns."""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import KernelTuning


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
    tuning: the kernels' tile, loop and group sizes.
  """
  k: int
  aux_k: int = 0
  aux_min_dead: int = 0
  batch_k_per_token: int = 0
  margin: float = 0.0
  block_size: int = 0
  dtype: str = 'float32'
  tuning: KernelTuning = DEFAULT_TUNING


class Candidates(NamedTuple):
  """A per-token top list, [R, m] each, in rank order (ties: the lower latent first).

  Attributes:
    scores: the selection scores (pre-activations with threshold, margin or
      ReLU applied as the spec says; AuxK: with the mask applied).
    values: float32 pre-activations at the selected entries.
    latents: int32 latent of each entry.
  """
  scores: jax.Array
  values: jax.Array
  latents: jax.Array


class AuxSelection(NamedTuple):
  """AuxK's per-token selection among the dead latents, [B, aux_k] each.

  Attributes:
    values: float32 pre-activations (zeros when the selection was skipped).
    latents: int32 latents.
  """
  values: jax.Array
  latents: jax.Array


def no_aux_selection(rows: int, aux_k: int) -> AuxSelection:
  """An AuxSelection of zeros: the selection skipped (or aux_k = 0)."""
  return AuxSelection(jnp.zeros((rows, aux_k), jnp.float32), jnp.zeros((rows, aux_k), jnp.int32))


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
      score near rank floor_slack * B * k among them, at least 0
      (`batch.candidate_floor`): a floor above which the next batch's
      candidates may be taken (see `BatchTopKSAE`).
  """
  values: jax.Array
  latents: jax.Array
  tokens: jax.Array | None
  aux_values: jax.Array
  aux_latents: jax.Array
  overflow: jax.Array
  min_score: jax.Array | None
  candidate_floor: jax.Array | None

  @property
  def aux(self) -> AuxSelection:
    """The AuxK selection."""
    return AuxSelection(self.aux_values, self.aux_latents)


# Sums over the batch axis of a [B, n] matrix.
#
# XLA's CPU backend reduces a wide matrix over its leading axis very slowly:
# jnp.sum(m, axis=0) of a [4096, 65536] float32 matrix takes 2.3 s on a 2-core
# AMD EPYC (YNNPACK's reduction), and the same sums as a product with a ones
# vector 43 ms (tools/bench_kernels.py, "column sums"). Autodiff writes such a
# sum for the gradient of every [n] vector broadcast over the batch (b_enc, a
# threshold, a penalty's per-latent weights), and the dense formulations count
# fired latents with one; at 65536 latents these sums cost the ReLU family's
# dense step more than two of its five matrix products. So a sum over the
# batch of a [B, n] matrix, forward or backward, is written as a product.


@jax.custom_vjp
def batch_sum(m):
  """sum_b m[b, :] of a [B, n] matrix, in float32, computed as ones[B] @ m.

  Precision HIGHEST: float32 products may otherwise round their inputs on
  GPUs (TF32). The gradient broadcasts the cotangent over the batch.
  """
  ones = jnp.ones((m.shape[0],), m.dtype)
  return jnp.dot(ones, m, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)


def _batch_sum_fwd(m):
  return batch_sum(m), jnp.zeros((m.shape[0], 0), m.dtype)  # m's rows and dtype


def _batch_sum_bwd(like, g):
  return (jnp.broadcast_to(g.astype(like.dtype), (like.shape[0],) + g.shape),)


batch_sum.defvjp(_batch_sum_fwd, _batch_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_rows(v, rows):
  """v [n] repeated as the rows of a [rows, n] matrix; its gradient is `batch_sum`'s product."""
  return jnp.broadcast_to(v, (rows,) + v.shape)


def _broadcast_rows_fwd(v, rows):
  return broadcast_rows(v, rows), jnp.zeros((0,), v.dtype)  # v's dtype


def _broadcast_rows_bwd(rows, like, g):
  return (batch_sum(g).astype(like.dtype),)


broadcast_rows.defvjp(_broadcast_rows_fwd, _broadcast_rows_bwd)


def preactivations(x, W_enc, b_enc, dtype):
  """x @ W_enc + b_enc: matmul inputs cast to `dtype`, float32 accumulation and result."""
  dtype = jnp.dtype(dtype)
  pre = jnp.dot(x.astype(dtype), W_enc.astype(dtype), preferred_element_type=jnp.float32)
  return pre + broadcast_rows(b_enc.astype(jnp.float32), pre.shape[0])


def check_block_size(n_latents, block_size, k_max, what='sae.encoder_block_size'):
  """Raises ValueError unless `block_size` is 0 or a divisor of n_latents >= k_max."""
  if block_size < 0 or (block_size and (n_latents % block_size or block_size < k_max)):
    raise ValueError(
        f'{what}={block_size} must be 0 (one block) or a divisor of n_latents='
        f'{n_latents} that is at least {k_max} (the largest per-token selection).')


def check_spec(spec: EncoderSpec, n_latents: int, *, threshold, aux_mask) -> None:
  """Raises ValueError on a spec inconsistent with itself or with its operands."""
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
  if per_token > n_latents:
    raise ValueError(f'cannot select {per_token} of {n_latents} latents per token')
  check_block_size(n_latents, spec.block_size, per_token)
  if spec.aux_k and aux_mask is None:
    raise ValueError('aux_k > 0 needs aux_mask')
