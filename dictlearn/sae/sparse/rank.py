"""Ranking: the exact top-k of rows, merging top lists, and the k-th largest of a batch.

Every selection keeps `lax.top_k`'s tie rule (equal scores: the lower index
first), so the grouped, tiled and blocked paths select exactly what one
`lax.top_k` over the whole row selects. On CPU `lax.top_k` costs 4-9 ns per
element where a max-reduction costs 0.2 ns: `top_k_rows` runs it in two masked
stages over groups of latents, several times cheaper than one top-k over the row.
NaN scores are not supported.
"""
import jax.numpy as jnp
from jax import lax

from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import KernelTuning


def group_size(n: int, k: int, tuning: KernelTuning = DEFAULT_TUNING) -> int:
  """Latents per group for the two-stage top-k, or 0 when lax.top_k is better."""
  lo, hi = tuning.topk_group_range
  g = lo
  while g < hi and g * g * 2 <= n // k:
    g *= 2
  if n % g or n // g < tuning.topk_min_groups_per_k * k:
    return 0
  return g


def mask_below_kth_bound(v, k):
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


def top_k_rows(scores, k, tuning: KernelTuning = DEFAULT_TUNING):
  """Top-k along the last axis; same values and indices as `lax.top_k`.

  When k is small relative to the width, runs in two stages over groups of g
  latents: the k groups with the largest maxima must hold the top k (any group
  outside them has a maximum no larger than the k-th value), so a top-k over
  the group maxima followed by a top-k over those k groups' members is exact.
  The groups are gathered in index order, which keeps lax's tie rule (equal
  values: the lower index first). Both stages mask entries below a lower bound
  of the k-th value first (`mask_below_kth_bound`; in the second stage the
  k-th largest group maximum), which cuts lax.top_k's cost on CPU about 3x.

  Args:
    scores: [R, n] or [n] array.
    k: number of entries to keep (static).
    tuning: the group sizes.

  Returns:
    (values, indices), each [..., k]; indices int32.
  """
  if scores.ndim == 1:
    values, indices = top_k_rows(scores[None], k, tuning)
    return values[0], indices[0]
  return scored_top_k(scores, k, tuning=tuning)


def scored_top_k(raw, k, vectors=(), score=None, tuning: KernelTuning = DEFAULT_TUNING):
  """`top_k_rows` of score(raw, *vectors) without forming the [R, n] scores.

  `score` is elementwise; `vectors` are [n] per-latent operands broadcast along
  the rows (a bias, a threshold). It is applied inside the group-maximum
  reduction and to the gathered candidates only, which saves a whole pass over
  the [R, n] block; the scores it returns are bit-identical to score applied to
  the whole block.

  Args:
    raw: [R, n].
    k: entries to keep per row.
    vectors: [n] operands of `score` after the raw block.
    score: elementwise (raw, *vectors) -> scores; None = raw itself.
    tuning: the group sizes.

  Returns:
    (scores [R, k], latents [R, k] int32), in lax.top_k order.
  """
  if score is None:
    score = lambda r: r
  rows, n = raw.shape
  g = group_size(n, k, tuning)
  if not g:
    return lax.top_k(score(raw, *vectors), k)
  n_groups = n // g
  grouped = raw.reshape(rows, n_groups, g)
  group_max = score(grouped, *(v.reshape(n_groups, g) for v in vectors)).max(axis=-1)
  group_max, groups = lax.top_k(mask_below_kth_bound(group_max, k), k)
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


def merge_top(run, new, k):
  """Merges two top lists (NamedTuples whose first field is the score, [R, m]
  each) into the top k; `run` wins ties (it holds the lower indices)."""
  scores = jnp.concatenate([run[0], new[0]], axis=-1)
  _, pos = lax.top_k(scores, k)
  return type(run)(*(jnp.take_along_axis(jnp.concatenate([a, b], axis=-1), pos, axis=-1)
                     for a, b in zip(run, new)))


def sortable_keys(values):
  """int32 keys with the order of the float32 values (-0.0 counted as +0.0)."""
  bits = lax.bitcast_convert_type(values.astype(jnp.float32) + 0.0, jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def kth_largest_key(keys, count):
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


def score_near_rank(scores, rank, tuning: KernelTuning = DEFAULT_TUNING):
  """About the rank-th largest (0-based) of `scores` (any shape).

  Sorts a strided sample of at most `tuning.rank_sample` entries (stride s,
  odd): an estimate whose true rank is off by about sqrt(rank * s) for scores
  in no particular order, at a few milliseconds where an exact selection among
  millions would cost a top-k or a bisection (callers need only a rough floor:
  exactness is checked elsewhere).
  When `rank` is past the last sampled entry, returns the smallest sampled.
  """
  flat = scores.reshape(-1)
  # An odd stride: rows of sorted candidates (a power-of-two length) are then
  # sampled at every rank, not at the top of each run of `stride`.
  stride = sample_stride(flat.shape[0], tuning)
  sample = jnp.sort(flat[::stride])
  return sample[sample.shape[0] - 1 - min(sample.shape[0] - 1, rank // stride)]


def sample_stride(size: int, tuning: KernelTuning = DEFAULT_TUNING) -> int:
  """The (odd) stride of `score_near_rank`'s sample of `size` scores."""
  return max(1, size // tuning.rank_sample) | 1
