"""Batch selection (BatchTopK): the B * k largest ReLU'd pre-activations of a batch.

Three ways to the same set, each exact where it is used:

* `exhaustive`: a top-k over the whole flattened [B, n] matrix (the reference,
  and the fallback);
* `from_candidates`: from each token's top c candidates (per-token selection),
  exact unless some token needs more than c;
* `batch_top`: from a capacity selection of every entry above a floor, exact
  when the selection holds at least B * k entries and no tie straddles the cut.

`candidate_floor` sets the floor for the next batch from this one's scores.
Ties are broken as the exhaustive selection breaks them (token-major order).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dictlearn.sae.sparse import rank
from dictlearn.sae.sparse.capacity import Selection
from dictlearn.sae.sparse.capacity import compact_positions
from dictlearn.sae.sparse.spec import Candidates
from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import KernelTuning


class Kept(NamedTuple):
  """A batch selection as flat triples laid out [B, k] (entry [r, j] is token tokens[r, j]'s).

  Attributes:
    values: float32 pre-activations.
    latents: int32 latents.
    tokens: int32 tokens.
  """
  values: jax.Array
  latents: jax.Array
  tokens: jax.Array


def exhaustive(pre, k_per_token) -> Kept:
  """BatchTopK over the whole flattened [B, n] matrix (the exact reference)."""
  batch, n = pre.shape
  total = batch * k_per_token
  _, pos = lax.top_k(jnp.maximum(pre, 0.0).reshape(-1), total)
  shape = (batch, k_per_token)
  return Kept(pre.reshape(-1)[pos].reshape(shape), (pos % n).astype(jnp.int32).reshape(shape),
              (pos // n).astype(jnp.int32).reshape(shape))


def candidate_floor(scores, total, floor=0.0, tuning: KernelTuning = DEFAULT_TUNING):
  """A floor for the next batch's candidates: about the floor_slack * total-th
  largest of `scores`, and at least `floor` (the floor `scores` were taken
  above, if any: fewer candidates than that rank keep it) and 0."""
  return jnp.maximum(rank.score_near_rank(scores, tuning.floor_slack * total, tuning),
                     jnp.maximum(floor, 0.0))


def from_candidates(cand: Candidates, k_per_token, exhaustive_fallback):
  """Keeps B * k_per_token entries across the batch from per-token candidates.

  Each token's candidates are its top c scores in rank order (ties by latent
  index). The flat top-k over them is found without sorting: the kept entries
  are those above the (B * k)-th largest candidate score t, then those equal to
  t in token-major order (the exhaustive selection's tie rule), so each token
  keeps a prefix of its candidates. The output lists the kept triples token by
  token, each in rank order. The candidates are exact unless some token kept
  all c of them with a positive last one (it might have had more); then
  `exhaustive_fallback()` (a Kept) serves instead.

  Returns:
    (Kept [B, k_per_token], overflow bool scalar: the fallback ran).
  """
  batch, c = cand.scores.shape
  total = batch * k_per_token
  keys = rank.sortable_keys(cand.scores)
  t = rank.kth_largest_key(keys, total)
  above = jnp.sum(keys > t, axis=1, dtype=jnp.int32)
  ties = jnp.sum(keys == t, axis=1, dtype=jnp.int32)
  ties_before = jnp.cumsum(ties) - ties
  kept = above + jnp.clip(total - jnp.sum(above) - ties_before, 0, ties)
  overflow = jnp.any((kept == c) & (cand.scores[:, c - 1] > 0))
  # Output slot j holds token b's candidate j - start[b], where start is the
  # exclusive running count of kept entries.
  start = jnp.cumsum(kept) - kept
  slots = jnp.arange(total, dtype=jnp.int32)
  tokens = (jnp.searchsorted(start, slots, side='right') - 1).astype(jnp.int32)
  flat = tokens * c + (slots - start[tokens])
  shape = (batch, k_per_token)
  fast = Kept(cand.values.reshape(-1)[flat].reshape(shape),
              cand.latents.reshape(-1)[flat].reshape(shape), tokens.reshape(shape))
  return lax.cond(overflow, exhaustive_fallback, lambda: fast), overflow


def batch_top(selection: Selection, total: int):
  """The `total` largest values of a capacity selection, as [B, total // B] flat triples.

  They are the batch's `total` largest pre-activations overall (the BatchTopK
  selection) when `exact`: the selection did not overflow, holds at least
  `total` entries (so every entry left out is below them), and no tie straddles
  the cut (a tie would be broken by the exhaustive selection's rule, token
  order, which this does not follow; the caller then takes another path).
  The kept triples stay in selection order.

  Returns:
    (Kept, exact bool scalar).
  """
  values = selection.values.reshape(-1)
  size = values.shape[0]
  keys = rank.sortable_keys(values)
  kept = keys >= rank.kth_largest_key(keys, total)
  index, n_kept = compact_positions(kept[None].astype(jnp.int32), total, size - 1)
  index = index[0]
  exact = ~selection.overflow & (selection.count >= total) & (n_kept[0] == total)
  shape = (selection.values.shape[0], total // selection.values.shape[0])
  pick = lambda a: a.reshape(-1)[index].reshape(shape)
  return Kept(pick(selection.values), pick(selection.latents), pick(selection.tokens)), exact
