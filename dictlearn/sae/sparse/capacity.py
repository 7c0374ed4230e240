"""Capacity selection: every entry with a positive score, as flat triples.

The ReLU-family SAEs (ReLU+L1, JumpReLU) activate a variable number of latents
per token. Their sparse path keeps every entry of pre = x @ W_enc + b_enc whose
score (pre - threshold) + margin is positive, as flat (token, latent, value)
triples, up to a capacity for the whole batch: `capacity` slots per token on
average, pooled over groups of `KernelTuning.capacity_group_rows` tokens, so a
token with many non-zeros borrows the slots its neighbours leave empty. When a
group holds more entries than its slots, the batch `overflow`s and the caller
computes it with the exact dense formulation instead (`lax.cond`), so results
are always exact.

No top-k is involved. Per tile of rows (and block of latents), the selection is
a compaction in two levels, all vectorised: the maximum score of each run of
`capacity_run` latents (a fast reduction fused with the matmul's output pass)
marks the runs holding an entry; a cumulative count lists those runs, and a
second count over their members lists the entries, in (token, latent) order.
Unused slots hold value -inf (activation 0, no gradient) at latent 0.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dictlearn.sae.sparse.spec import check_block_size
from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import KernelTuning
from dictlearn.sae.sparse.tuning import divisor_at_most
from dictlearn.sae.sparse.tuning import tile_rows


class Selection(NamedTuple):
  """Flat triples laid out as [B, capacity] (entry [r, j] is token tokens[r, j]'s).

  Attributes:
    values: float32 pre-activations at the selected entries; -inf in unused slots.
    latents: int32 latent of each entry (0 in unused slots).
    tokens: int32 token of each entry.
    overflow: bool scalar: some group of tokens had more entries than slots;
      the other fields are then incomplete and must not be used.
    count: int32 scalar, entries selected (meaningful without overflow).
  """
  values: jax.Array
  latents: jax.Array
  tokens: jax.Array
  overflow: jax.Array
  count: jax.Array


class _Entries(NamedTuple):
  """Entries compacted per group of rows, [G, slots] each (unused slots: value -inf)."""
  values: jax.Array
  latents: jax.Array
  rows: jax.Array  # the entry's row (within the tile, or a token of the batch)


def _run_size(n, tuning):
  run = tuning.capacity_run
  while run > 1 and n % run:
    run //= 2
  return run


def compact_positions(flags, slots, fill):
  """Stream compaction of each row of flags [P, L] (0/1 int32) into `slots` slots.

  Returns (index [P, slots] int32: the index of the j-th set flag of row p, or
  `fill` past the row's last one; counts [P]). A cumulative count gives each
  set flag its slot, and one scatter writes the indices there (flags past the
  slots are dropped): far cheaper on CPU than searching the counts per slot.
  """
  rows, length = flags.shape
  cum = jnp.cumsum(flags, axis=1)
  slot = jnp.where(flags > 0, cum - 1, slots)
  dest = jnp.where(slot < slots, jnp.arange(rows, dtype=jnp.int32)[:, None] * slots + slot,
                   rows * slots)
  source = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
  index = jnp.full((rows * slots,), fill, jnp.int32).at[dest.reshape(-1)].set(
      source.reshape(-1), mode='drop')
  return index.reshape(rows, slots), cum[:, -1]


def _compact(raw, vectors, score, slots, group_rows, tuning):
  """Entries of one [R, n] block with score(raw, *vectors) > 0, compacted per group.

  Args:
    raw: [R, n] float32 matmul output.
    vectors: per-latent [n] operands of `score`; vectors[0] is the bias.
    score: elementwise (raw, *vectors) -> scores.
    slots: slots per group of rows.
    group_rows: rows per group (divides R).
    tuning: the run size.

  Returns:
    (_Entries [R // group_rows, slots] (rows: row within the block), count
    [R // group_rows], the entries of each group (possibly more than `slots`)).
  """
  n_rows, n = raw.shape
  run = _run_size(n, tuning)
  n_runs = n // run
  groups = n_rows // group_rows
  runs = raw.reshape(n_rows, n_runs, run)
  run_vectors = [v.reshape(n_runs, run) for v in vectors]
  # Level 1: the runs holding an entry, listed per group in (row, run) order.
  hit = jnp.max(score(runs, *run_vectors), axis=-1) > 0
  hit = hit.reshape(groups, group_rows * n_runs).astype(jnp.int32)
  slot = jnp.arange(slots, dtype=jnp.int32)
  hit_runs, n_hit = compact_positions(hit, slots, group_rows * n_runs - 1)
  listed = slot < n_hit[:, None]  # a group with fewer hit runs leaves slots unused
  # Level 2: the members of the listed runs (at most `slots` runs, each holding
  # at least one entry, suffice unless the group overflows).
  flat_run = jnp.arange(groups, dtype=jnp.int32)[:, None] * (group_rows * n_runs) + hit_runs
  members = jnp.take(runs.reshape(n_rows * n_runs, run), flat_run.reshape(-1), axis=0,
                     mode='clip').reshape(groups, slots, run)
  run_of = hit_runs % n_runs
  member_vectors = [jnp.take(v, run_of, axis=0, mode='clip') for v in run_vectors]
  inside = (score(members, *member_vectors) > 0) & listed[..., None]
  inside = inside.reshape(groups, slots * run).astype(jnp.int32)
  entry, count = compact_positions(inside, slots, slots * run - 1)
  # More hit runs than slots: the listed runs hold only part of the entries,
  # but there are more entries than slots (each hit run holds one at least).
  count = jnp.maximum(count, n_hit)
  listed_run, member = entry // run, entry % run
  run_index = jnp.take_along_axis(run_of, listed_run, axis=1)
  latents = run_index * run + member
  rows = (jnp.arange(groups, dtype=jnp.int32)[:, None] * group_rows
          + jnp.take_along_axis(hit_runs, listed_run, axis=1) // n_runs)
  pre = (jnp.take_along_axis(members.reshape(groups, slots * run), entry, axis=1)
         + jnp.take(vectors[0], latents, mode='clip'))
  used = slot < count[:, None]
  values = jnp.where(used, pre, -jnp.inf)
  return _Entries(values, jnp.where(used, latents, 0), rows), count


def _merge(acc, new, offset):
  """Appends `new` _Entries [G, S] after the first `offset` [G] slots of `acc`;
  what does not fit is dropped (the caller flags the overflow)."""
  slots = acc.values.shape[1]
  slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
  source = jnp.clip(slot - offset[:, None], 0, slots - 1)
  keep = slot < offset[:, None]
  return _Entries(*(jnp.where(keep, a, jnp.take_along_axis(b, source, axis=1))
                    for a, b in zip(acc, new)))


def select_positive(x, W_enc, b_enc, capacity, *, threshold=None, margin=0.0, block_size=0,
                    dtype='float32', tuning: KernelTuning = DEFAULT_TUNING):
  """Every entry with (pre - threshold) + margin > 0, up to `capacity` per token on average.

  pre = x @ W_enc + b_enc (matmul inputs in `dtype`, float32 accumulation).
  Tokens pool their slots in groups of up to `tuning.capacity_group_rows`; once
  a group has overflowed, the tiles after it are skipped, matmul included (the
  caller recomputes the batch densely).

  Args:
    x: [B, d].
    W_enc: [d, n].
    b_enc: [n].
    capacity: slots per token (static, >= 1).
    threshold: optional [n] subtracted from pre in the score (JumpReLU).
    margin: added to the score (static float).
    block_size: latents per encoder block (0 = one block; else a divisor of n).
    dtype: matmul input dtype name.
    tuning: tile, group and run sizes.

  Returns:
    Selection; values are the pre-activations (no threshold or margin applied).
  """
  if capacity < 1:
    raise ValueError(f'capacity must be positive, got {capacity}')
  batch, d = x.shape
  n = W_enc.shape[1]
  bs = block_size or n
  check_block_size(n, block_size, 1)
  rows = tile_rows(batch, bs, tuning)
  tiles = batch // rows
  group_rows = divisor_at_most(rows, tuning.capacity_group_rows)
  groups, slots = rows // group_rows, group_rows * capacity
  x3 = x.reshape(rows, tiles, d)
  mm_dtype = jnp.dtype(dtype)
  bias = b_enc.astype(jnp.float32)
  thr = None if threshold is None else threshold.astype(jnp.float32)

  def score(r, b, *t):
    s = r + b
    if t:
      s = s - t[0]
    return s + jnp.float32(margin) if margin else s

  def tile_block(i, j, acc, count):
    """Merges block j of tile i into the tile's selection so far, `acc`."""
    x_tile = lax.dynamic_index_in_dim(x3, i, axis=1, keepdims=False)
    cut = lambda a: a if bs == n else lax.dynamic_slice_in_dim(a, j * bs, bs, axis=-1)
    raw = jnp.dot(x_tile.astype(mm_dtype), cut(W_enc).astype(mm_dtype),
                  preferred_element_type=jnp.float32)
    vectors = (cut(bias),) if thr is None else (cut(bias), cut(thr))
    new, new_count = _compact(raw, vectors, score, slots, group_rows, tuning)
    new = _Entries(new.values, jnp.where(new.values > -jnp.inf, new.latents + j * bs, 0),
                   new.rows * tiles + i)  # tile i holds rows i, i + T, ...
    if bs == n:  # one block: nothing to append to
      return new, new_count
    return _merge(acc, new, count), count + new_count

  def body(step, carry):
    acc, count, overflow = carry
    i, j = step % tiles, step // tiles

    def work(args):
      acc, count = args
      tile_acc = _Entries(*(lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False) for a in acc))
      tile_acc, tile_count = tile_block(i, j, tile_acc,
                                        lax.dynamic_index_in_dim(count, i, keepdims=False))
      acc = _Entries(*(lax.dynamic_update_index_in_dim(a, b, i, axis=0)
                       for a, b in zip(acc, tile_acc)))
      count = lax.dynamic_update_index_in_dim(count, tile_count, i, axis=0)
      return acc, count, jnp.any(tile_count > slots)

    return lax.cond(overflow, lambda args: args + (overflow,), work, (acc, count))

  acc = _Entries(jnp.full((tiles, groups, slots), -jnp.inf, jnp.float32),
                 jnp.zeros((tiles, groups, slots), jnp.int32),
                 jnp.zeros((tiles, groups, slots), jnp.int32))
  count = jnp.zeros((tiles, groups), jnp.int32)
  acc, count, overflow = lax.fori_loop(0, tiles * (n // bs), body,
                                       (acc, count, jnp.asarray(False)))
  shape = (batch, capacity)
  return Selection(acc.values.reshape(shape), acc.latents.reshape(shape),
                   acc.rows.reshape(shape), overflow, jnp.sum(count))
