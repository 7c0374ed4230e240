"""The tuning constants of the sparse kernels, in one typed place.

None of these changes a result beyond the order in which floats are summed:
every path they choose between is exact. They trade memory for speed and set
where a loop replaces a vectorised op. Tests pass a `KernelTuning` with small
values to exercise the tiled, looped and merged paths on small problems
(`dataclasses.replace(DEFAULT_TUNING, ...)`).
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelTuning:
  """Sizes that choose between the exact paths of the sparse kernels (hashable).

  Attributes:
    topk_group_range: (smallest, largest) latents per group of the two-stage
      top-k (`top_k_rows`): about sqrt(width / k), a power of two in this
      range. Smaller groups make the first stage's top-k longer, larger ones
      the second's.
    topk_min_groups_per_k: the two-stage top-k needs at least this many groups
      per selected entry; narrower rows use lax.top_k directly (the grouping
      would gain nothing).
    tile_bytes: the unblocked encoder runs over tiles of rows whose [rows, n]
      float32 pre-activations take about this many bytes: on CPU a large fresh
      buffer costs more to page in than to compute, and a tile that stays in
      the cache is read back cheaply by the selection.
    min_tile_rows: at least this many rows per encoder tile, so that each pass
      over W_enc serves many tokens (the matmul stays efficient).
    max_collected: the blocked encoder collects each block's candidates and
      selects once when there are at most this many per token; beyond, it
      merges block by block (a long top-k costs more than several short ones).
    vectorize_max_elements: each step of the sparse row loops gathers or
      scatters at most this many elements ([rows, m, d]; 64 rows of 32 entries
      of 576 floats): big enough that a loop step's fixed cost is small, small
      enough that the gathered rows stay in the cache. Problems this small
      take one step.
    rank_sample: `score_near_rank` sorts a strided sample of at most this many
      scores (a few milliseconds; its error is about sqrt(rank * stride)).
    floor_slack: BatchTopK's candidate floor for the next batch sits at rank
      floor_slack * B * k of this batch's scores, so that a batch with a few
      more large scores than the last still finds all of its top B * k above it.
    capacity_run: latents per run of the capacity selection's first level (a
      power of two dividing n_latents, at most this): a run's maximum is one
      fast reduction, and only runs holding an entry are opened.
    capacity_group_rows: tokens that pool their slots in the capacity
      selection (a divisor of the tile's rows, at most this): larger groups
      overflow less often on uneven tokens, smaller ones keep the compaction's
      cumulative counts short.
    aux_dense_fraction: TopK's AuxK runs densely over the gathered dead latents
      when at most max(aux_k, n_latents // aux_dense_fraction) are dead (the
      usual case): three small matmuls beat a second selection.
    aux_dense_max_latents: above this many latents AuxK always uses the
      encoder's (blocked) selection: the dense path's gathered [B, cap]
      pre-activations and whole-dictionary gradients would cost gigabytes.
    sort_row_blocks: `batch_mse` (BatchTopK) reorders its flat triples by
      latent before the decode and the gradient scatter-adds, each of this
      many blocks of rows on its own. Sorted, the updates of one [n, d]
      accumulator row come one after another while the row is in the cache;
      in selection order each lands on a random row of a table larger than the
      cache. Set it to the number of devices the batch's rows are split over
      (the trainer does), so that no sort crosses devices.
  """
  topk_group_range: tuple[int, int] = (8, 128)
  topk_min_groups_per_k: int = 4
  tile_bytes: int = 32 << 20
  min_tile_rows: int = 512
  max_collected: int = 2048
  vectorize_max_elements: int = 1 << 21
  rank_sample: int = 1 << 15
  floor_slack: int = 2
  capacity_run: int = 16
  capacity_group_rows: int = 64
  aux_dense_fraction: int = 8
  aux_dense_max_latents: int = 1 << 17
  sort_row_blocks: int = 1


DEFAULT_TUNING = KernelTuning()


def divisor_at_most(m: int, cap: int) -> int:
  """The largest divisor of m that is at most max(cap, 1)."""
  cap = max(1, min(m, cap))
  return max(t for t in range(1, cap + 1) if m % t == 0)


def tile_rows(batch: int, width: int, tuning: KernelTuning = DEFAULT_TUNING) -> int:
  """Rows per encoder tile for blocks of `width` latents: the largest divisor of
  `batch` not above max(min_tile_rows, tile_bytes / (4 * width))."""
  return divisor_at_most(batch, max(tuning.min_tile_rows, tuning.tile_bytes // (4 * width)))
