"""Capacity selection (every positive entry as flat triples) against the dense matrix."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.sae import sparse
from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import tile_rows

B, D = 64, 8


def _inputs(n, seed=0, bias_low=-8):
  """Integer-valued x, W_enc, b_enc (exact sums, many zeros and ties) and a decoder."""
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.randint(ks[0], (B, D), -2, 3).astype(jnp.float32)
  w = jax.random.randint(ks[1], (D, n), -2, 3).astype(jnp.float32)
  b = jax.random.randint(ks[2], (n,), bias_low, 2).astype(jnp.float32)
  w_dec = jax.random.normal(ks[3], (n, D))
  return x, w, b, w_dec


def _densified(sel, n):
  """The selection scattered into [B, n] (unused slots left out), and a used-slot check."""
  v, lat, tok = (np.asarray(a) for a in (sel.values, sel.latents, sel.tokens))
  used = np.isfinite(v)
  assert np.all(lat[~used] == 0)
  dense = np.zeros((B, n))
  np.add.at(dense, (tok[used], lat[used]), v[used])
  # No entry is listed twice.
  assert len(set(zip(tok[used].tolist(), lat[used].tolist()))) == used.sum()
  return dense, int(used.sum())


def _small_tiles(rows, group_rows, run):
  """A tuning with tiles of `rows` rows for width-64 blocks, groups and runs as given."""
  return dataclasses.replace(DEFAULT_TUNING, min_tile_rows=1, tile_bytes=4 * rows * 64,
                             capacity_group_rows=group_rows, capacity_run=run)


@pytest.mark.parametrize('block_size,tiled', [(0, False), (64, False), (0, True), (16, True)])
def test_selects_exactly_the_positive_entries(block_size, tiled):
  n = 64
  tuning = DEFAULT_TUNING
  if tiled:  # 4 tiles of 16 rows, groups of 8 rows, runs of 4 latents
    tuning = _small_tiles(16, 8, 4)
    assert tile_rows(B, 64, tuning) == 16
  x, w, b, _ = _inputs(n)
  pre = np.asarray(x @ w + b)
  need = int((pre > 0).sum(1).max())
  sel = jax.jit(lambda x, w, b: sparse.select_positive(x, w, b, need, block_size=block_size,
                                                       tuning=tuning))(x, w, b)
  assert not bool(sel.overflow)
  dense, used = _densified(sel, n)
  np.testing.assert_array_equal(dense, np.where(pre > 0, pre, 0.0))
  assert used == int(sel.count) == int((pre > 0).sum())


def test_threshold_and_margin():
  n = 64
  x, w, b, _ = _inputs(n, seed=1, bias_low=-2)
  theta = jnp.where(jnp.arange(n) % 2 == 0, 1.0, 3.0)
  pre = np.asarray(x @ w + b)
  keep = (pre - np.asarray(theta)) + 0.5 > 0
  sel = sparse.select_positive(x, w, b, n, threshold=theta, margin=0.5)
  dense, used = _densified(sel, n)
  np.testing.assert_array_equal(dense, np.where(keep, pre, 0.0))  # values are pre, not scores
  assert used == keep.sum()


def test_tokens_pool_their_slots_and_overflow_is_per_group():
  # One tile of 64 rows, groups of 16 rows: a group overflows when its rows
  # hold more than 16 * capacity entries, whatever a single row holds.
  tuning = _small_tiles(64, 16, 4)
  n = 64
  x, w, b, _ = _inputs(n, seed=2)
  counts = np.asarray(jnp.sum(x @ w + b > 0, axis=1))
  per_group = counts.reshape(4, 16).sum(1)  # one tile: rows in order
  edge = int(np.ceil(per_group.max() / 16))  # the least capacity that holds every group
  for cap in (1, edge - 1, edge, int(counts.max())):
    sel = jax.jit(lambda x, w, b, c=cap: sparse.select_positive(x, w, b, c, tuning=tuning))(
        x, w, b)
    assert bool(sel.overflow) == bool(per_group.max() > 16 * cap), cap
    if not bool(sel.overflow):
      dense, _ = _densified(sel, n)
      pre = np.asarray(x @ w + b)
      np.testing.assert_array_equal(dense, np.where(pre > 0, pre, 0.0))
  # A row may hold more entries than the average capacity.
  assert counts.max() > edge
  assert not bool(sparse.select_positive(x, w, b, edge, tuning=tuning).overflow)


def test_more_hit_runs_than_slots_overflows():
  # Every run holds exactly one entry: the runs alone exceed the slots.
  tuning = _small_tiles(64, 64, 8)
  n = 64
  x = jnp.ones((B, 1))
  w = jnp.where(jnp.arange(n) % 8 == 0, 1.0, -1.0)[None, :]  # 8 positive entries per row
  b = jnp.zeros((n,))
  assert bool(sparse.select_positive(x, w, b, 7, tuning=tuning).overflow)
  sel = sparse.select_positive(x, w, b, 8, tuning=tuning)
  assert not bool(sel.overflow) and int(sel.count) == 8 * B


def test_overflow_in_any_tile_is_flagged():
  # 4 tiles of 16 rows (tile t holds rows t, t + 4, ...), one group each. Rows
  # of x = 0.55 hold 6 entries, rows of x = 1 hold 32: making one tile's rows
  # crowded overflows it; the tiles after an overflow are skipped.
  tuning = _small_tiles(16, 16, 4)
  n = 64
  w = (jnp.arange(n, dtype=jnp.float32)[None, :] + 1) / n
  b = jnp.full((n,), -0.5)
  x = jnp.full((B, 1), 0.55)
  select = jax.jit(lambda x: sparse.select_positive(x, w, b, 8, tuning=tuning))
  assert int(jnp.sum(x @ w + b > 0)) == 6 * B and not bool(select(x).overflow)
  for tile in range(4):
    assert bool(select(x.at[tile + 4 * np.arange(16)].set(1.0)).overflow)
  assert not bool(select(x.at[0].set(1.0)).overflow)  # one crowded row: 32 + 15 * 6 <= 128


def test_with_encoder_vjp_matches_dense_gradients():
  tuning = _small_tiles(16, 8, 4)
  n = 64
  x, w, b, w_dec = _inputs(n, seed=4)
  x, w = x + 0.25, w * 0.5  # non-integer values, same sparsity pattern style
  target = jax.random.normal(jax.random.key(9), (B, D))

  def selected(x, w, b, w_dec):
    sel = sparse.select_positive(jax.lax.stop_gradient(x), jax.lax.stop_gradient(w),
                                 jax.lax.stop_gradient(b), n, tuning=tuning)
    acts = jax.nn.relu(sparse.with_encoder_vjp(sel, x, w, b, tuning))
    y = sparse.sparse_decode(acts, sel.latents, w_dec, sel.tokens, tuning)
    return jnp.sum((y - target) ** 2) + jnp.sum(jnp.sin(acts))

  def dense(x, w, b, w_dec):
    acts = jax.nn.relu(x @ w + b)
    return jnp.sum((acts @ w_dec - target) ** 2) + jnp.sum(jnp.sin(acts))

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, w, b, w_dec)
  (l1, g1), (l2, g2) = grad(selected), grad(dense)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, c in zip(g1, g2):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * float(jnp.abs(c).max()))


def test_bad_capacity():
  x, w, b, _ = _inputs(64)
  with pytest.raises(ValueError, match='capacity'):
    sparse.select_positive(x, w, b, 0)


@pytest.mark.parametrize('integer', [False, True])
def test_batch_top_is_the_batch_topk_when_exact(integer):
  n, k = 64, 3
  x, w, b, _ = _inputs(n, seed=5, bias_low=-1)
  if not integer:
    x = x + 0.1 * jax.random.normal(jax.random.key(1), x.shape)
  pre = x @ w + b
  total = B * k
  top = np.sort(np.asarray(pre).ravel())[::-1]
  ref_values, ref_pos = jax.lax.top_k(jax.nn.relu(pre).reshape(-1), total)
  ref = set(np.asarray(ref_pos).tolist())
  for floor, expect_exact in ((0.5 * top[total], True), (top[total // 2], False)):
    sel = sparse.select_positive(x, w, b, 2 * n, threshold=jnp.full((n,), floor))
    kept, exact = sparse.batch_top(sel, total)
    tied = bool(top[total - 1] == top[total])
    assert bool(exact) == (expect_exact and not tied)
    if bool(exact):
      got = np.asarray(kept.tokens).ravel() * n + np.asarray(kept.latents).ravel()
      assert set(got.tolist()) == ref
      np.testing.assert_array_equal(np.sort(np.asarray(kept.values).ravel()),
                                    np.sort(np.asarray(ref_values)))
  assert integer or not tied  # the float case exercises the exact path
