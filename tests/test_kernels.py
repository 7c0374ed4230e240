"""Sparse kernels against the dense formulation: values and gradients, ties included."""
import dataclasses

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dictlearn.sae import sparse
from dictlearn.sae.sparse import fused
from dictlearn.sae.sparse import rank
from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import tile_rows

B, D = 16, 8
# Every row gather and scatter in loops of one row.
LOOPS = dataclasses.replace(DEFAULT_TUNING, vectorize_max_elements=0)


@pytest.fixture(params=['vectorized', 'loops'])
def row_ops(request):
  """The tuning of both forms of the sparse row gathers and scatters."""
  return LOOPS if request.param == 'loops' else DEFAULT_TUNING


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def _close_all(a, b, tol=1e-5):
  """`_close` over the matching leaves of two pytrees (a loss and its gradients)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    _close(x, y, tol)


def _inputs(n, integer, seed=0):
  """x, W_enc, b_enc, W_dec, target. Integer-valued entries make exact ties common."""
  ks = jax.random.split(jax.random.key(seed), 5)
  if integer:
    x = jax.random.randint(ks[0], (B, D), -2, 3).astype(jnp.float32)
    w = jax.random.randint(ks[1], (D, n), -2, 3).astype(jnp.float32)
    b = jax.random.randint(ks[2], (n,), -1, 2).astype(jnp.float32)
  else:
    x = jax.random.normal(ks[0], (B, D))
    w = jax.random.normal(ks[1], (D, n)) / np.sqrt(D)
    b = 0.1 * jax.random.normal(ks[2], (n,))
  w_dec = jax.random.normal(ks[3], (n, D))
  target = jax.random.normal(ks[4], (B, D))
  return x, w, b, w_dec, target


def _dense_mask(pre, latents, tokens=None):
  rows = jnp.arange(pre.shape[0])[:, None] if tokens is None else tokens
  return jnp.zeros_like(pre).at[rows, latents].set(1.0)


# ---- sums over the batch ----------------------------------------------------

@pytest.mark.parametrize('sharded', [False, True])
def test_batch_sums_as_products_match_reductions(sharded):
  """batch_sum and broadcast_rows (sums over the batch written as products)
  against jnp.sum and broadcasting: values, gradients, sharded over a mesh."""
  m = jax.random.normal(jax.random.key(0), (B, 64))
  v = jax.random.normal(jax.random.key(1), (64,))

  def ours(m, v):
    return jnp.sum(jnp.sin(m + sparse.broadcast_rows(v, B)) * sparse.batch_sum(m * m))

  def reference(m, v):
    return jnp.sum(jnp.sin(m + v) * jnp.sum(m * m, axis=0))

  if sharded:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
    m = jax.device_put(m, NamedSharding(mesh, P('data', 'model')))
    v = jax.device_put(v, NamedSharding(mesh, P('model')))
  got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(m, v)
  _close_all(got, jax.value_and_grad(reference, argnums=(0, 1))(m, v))
  counts = sparse.batch_sum((m > 0).astype(jnp.float32))
  np.testing.assert_array_equal(counts, np.sum(np.asarray(m) > 0, axis=0))
  half = jax.grad(lambda m: jnp.sum(sparse.batch_sum(m) ** 2))(m.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16


# ---- top-k ----------------------------------------------------------------


@pytest.mark.parametrize('n,k', [(1024, 4), (1024, 32), (64, 5)])
def test_top_k_rows_matches_lax_with_ties(n, k):
  scores = jax.random.randint(jax.random.key(n + k), (B, n), -3, 4).astype(jnp.float32)
  scores = scores.at[0].set(0.0).at[1, :].set(-jnp.inf).at[1, 7].set(1.0)
  v1, i1 = sparse.top_k_rows(scores, k)
  v2, i2 = lax.top_k(scores, k)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_array_equal(v1, v2)


# ---- TopK encode + decode ---------------------------------------------------


def _topk_pipeline_sparse(k, tuning):
  def f(x, w, b, w_dec, target):
    out = sparse.encode_select(x, w, b, sparse.EncoderSpec(k=k, tuning=tuning))
    y = sparse.sparse_decode(jax.nn.relu(out.values), out.latents, w_dec, tuning=tuning)
    return jnp.sum((y - target) ** 2), (out.values, out.latents)
  return f


def _topk_pipeline_dense(k):
  def f(x, w, b, w_dec, target):
    pre = x @ w + b
    _, idx = lax.top_k(pre, k)
    acts = jax.nn.relu(pre) * _dense_mask(pre, idx)
    y = acts @ w_dec
    return jnp.sum((y - target) ** 2), (jnp.take_along_axis(pre, idx, 1), idx)
  return f


@pytest.mark.parametrize('n,k,integer', [(64, 5, False), (1024, 4, True)])
def test_topk_sparse_matches_dense(n, k, integer, row_ops):
  args = _inputs(n, integer)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  (l1, (v1, i1)), g1 = grad(_topk_pipeline_sparse(k, row_ops))(*args)
  (l2, (v2, i2)), g2 = grad(_topk_pipeline_dense(k))(*args)
  np.testing.assert_array_equal(i1, i2)
  _close(v1, v2)
  _close_all((l1, g1), (l2, g2))


def test_blocked_encoder_equals_unblocked():
  n, k = 128, 6
  args = _inputs(n, True, seed=3)  # integer-valued: many ties
  dead = jnp.arange(n) % 3 == 0
  specs = [sparse.EncoderSpec(k=k, aux_k=8, block_size=bs) for bs in (0, 32)]

  def f(spec):
    def loss(x, w, b):
      out = sparse.encode_select(x, w, b, spec, aux_mask=dead)
      return jnp.sum(jnp.sin(out.values)) + jnp.sum(jnp.cos(out.aux_values)), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  (l1, o1), g1 = f(specs[0])(*args[:3])
  (l2, o2), g2 = f(specs[1])(*args[:3])
  np.testing.assert_array_equal(o1.latents, o2.latents)
  np.testing.assert_array_equal(o1.aux_latents, o2.aux_latents)
  _close(o1.values, o2.values)
  _close_all((l1, g1), (l2, g2))
  # The AuxK selection is the top-k among dead latents only.
  pre = args[0] @ args[1] + args[2]
  _, ref = lax.top_k(jnp.where(dead, pre, -jnp.inf), 8)
  np.testing.assert_array_equal(o1.aux_latents, ref)


def test_aux_selection_skipped_without_dead_latents():
  x, w, b, _, _ = _inputs(64, False)
  spec = sparse.EncoderSpec(k=4, aux_k=8)
  out = sparse.encode_select(x, w, b, spec, aux_mask=jnp.zeros(64, bool))
  assert out.aux_values.shape == (B, 8)
  np.testing.assert_array_equal(out.aux_values, 0.0)


def test_sparse_decode_with_tokens_matches_dense(row_ops):
  n, m = 32, 5
  ks = jax.random.split(jax.random.key(7), 4)
  values = jax.random.normal(ks[0], (B, m))
  latents = jax.random.randint(ks[1], (B, m), 0, n)
  tokens = jax.random.randint(ks[2], (B, m), 0, B)
  w_dec = jax.random.normal(ks[3], (n, D))

  def dense(values, w_dec):
    acts = jnp.zeros((B, n)).at[tokens, latents].add(values)
    return jnp.sum(jnp.tanh(acts @ w_dec))

  def decoded(values, w_dec):
    return jnp.sum(jnp.tanh(sparse.sparse_decode(values, latents, w_dec, tokens, row_ops)))

  (l1, g1), (l2, g2) = [jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(values, w_dec)
                        for f in (decoded, dense)]
  _close_all((l1, g1), (l2, g2))


# ---- BatchTopK selection ----------------------------------------------------


def _batch_pipeline(spec):
  def f(x, w, b, w_dec, target):
    out = sparse.encode_select(x, w, b, spec)
    y = sparse.sparse_decode(jax.nn.relu(out.values), out.latents, w_dec, out.tokens,
                             spec.tuning)
    return jnp.sum((y - target) ** 2), out
  return f


def _batch_pipeline_dense(k):
  def f(x, w, b, w_dec, target):
    pre = x @ w + b
    _, pos = lax.top_k(jax.nn.relu(pre).reshape(-1), k * B)
    mask = jnp.zeros(pre.size).at[pos].set(1.0).reshape(pre.shape)
    y = (jax.nn.relu(pre) * mask) @ w_dec
    return jnp.sum((y - target) ** 2), mask
  return f


@pytest.mark.parametrize('capacity,integer,block_size', [
    (0, False, 0), (6, False, 0), (6, True, 0), (3, False, 0), (6, True, 16)])
def test_batch_selection_matches_dense(capacity, integer, block_size):
  n, k = 64, 3
  args = _inputs(n, integer, seed=11)
  # Blocked: also covers the looped row ops with tokens.
  spec = sparse.EncoderSpec(k=capacity, batch_k_per_token=k, block_size=block_size,
                            tuning=LOOPS if block_size else DEFAULT_TUNING)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  (l1, out), g1 = grad(_batch_pipeline(spec))(*args)
  (l2, mask), g2 = grad(_batch_pipeline_dense(k))(*args)
  assert out.values.shape == (B, k)  # exactly k * B triples
  kept = np.zeros((B, n))
  np.add.at(kept, (np.asarray(out.tokens), np.asarray(out.latents)),
            np.asarray(out.values) > 0)
  ref = np.asarray(mask) * (np.asarray(args[0] @ args[1] + args[2]) > 0)
  np.testing.assert_array_equal(kept, ref)
  _close_all((l1, g1), (l2, g2))
  if capacity == k:  # k candidates per token cannot hold a varying count
    assert bool(out.overflow)


def test_batch_selection_overflow_flag():
  # One token dominates: it needs all of the k * B slots.
  n, k = 64, 2
  x, w, b, _, _ = _inputs(n, False)
  x = x.at[0].set(100.0 * jnp.sign(w.sum(1)))
  spec = sparse.EncoderSpec(k=8, batch_k_per_token=k)
  out = sparse.encode_select(x, w, b, spec)
  assert bool(out.overflow)
  assert int(jnp.sum(out.tokens == 0)) > 8


# ---- sharding and dtype ------------------------------------------------------


def test_sharded_matches_unsharded():
  n, k = 1024, 4  # wide enough for the grouped top-k
  x, w, b, w_dec, target = _inputs(n, False, seed=5)
  dead = jnp.arange(n) % 64 == 1
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))

  def loss(x, w, b, w_dec, target):
    out = sparse.encode_select(x, w, b, sparse.EncoderSpec(k=k, aux_k=6), aux_mask=dead)
    y = sparse.sparse_decode(jax.nn.relu(out.values), out.latents, w_dec)
    e = sparse.sparse_decode(jax.nn.relu(out.aux_values), out.aux_latents, w_dec)
    return jnp.sum((y - target) ** 2) + jnp.sum(e ** 2)

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  l1, g1 = f(x, w, b, w_dec, target)
  sharded = (put(x, 'data', None), put(w, None, 'model'), put(b, 'model'),
             put(w_dec, 'model', None), put(target, 'data', None))
  l2, g2 = f(*sharded)
  assert g2[1].sharding.spec == P(None, 'model') or len(g2[1].sharding.device_set) == 8
  _close_all((l1, g1), (l2, g2))


def test_bfloat16_matmul_close_to_float32():
  x, w, b, _, _ = _inputs(64, False)
  spec32 = sparse.EncoderSpec(k=4)
  spec16 = sparse.EncoderSpec(k=4, dtype='bfloat16')
  o32 = sparse.encode_select(x, w, b, spec32)
  o16 = sparse.encode_select(x, w, b, spec16)
  assert o16.values.dtype == jnp.float32
  pre16 = jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                  preferred_element_type=jnp.float32) + b
  np.testing.assert_allclose(o16.values, jnp.take_along_axis(pre16, o16.latents, 1),
                             rtol=1e-6)
  np.testing.assert_allclose(o16.values, o32.values, atol=0.05)


@pytest.mark.parametrize('n_dead', [12, 5])
def test_aux_selection_among_few_dead_latents(n_dead):
  # At most n / 8 dead: the selection runs over the gathered dead latents.
  n, aux_k = 128, 8
  x, w, b, _, _ = _inputs(n, True, seed=2)
  dead = jnp.zeros(n, bool).at[jnp.arange(n_dead) * 9 + 3].set(True)
  out = sparse.encode_select(x, w, b, sparse.EncoderSpec(k=4, aux_k=aux_k), aux_mask=dead)
  pre = x @ w + b
  ref_values, ref = lax.top_k(jnp.where(dead, pre, -jnp.inf), aux_k)
  np.testing.assert_array_equal(out.aux_latents, ref)
  _close(out.aux_values, jnp.take_along_axis(pre, ref, 1))


def test_aux_selection_skipped_with_few_dead_latents():
  # aux_min_dead: the caller handles up to that many dead latents itself.
  x, w, b, _, _ = _inputs(64, False)
  dead = jnp.arange(64) < 6
  for block_size in (0, 16):
    spec = sparse.EncoderSpec(k=4, aux_k=4, aux_min_dead=6, block_size=block_size)
    out = sparse.encode_select(x, w, b, spec, aux_mask=dead)
    np.testing.assert_array_equal(out.aux_values, 0.0)
    spec = sparse.EncoderSpec(k=4, aux_k=4, aux_min_dead=5, block_size=block_size)
    out = sparse.encode_select(x, w, b, spec, aux_mask=dead)
    assert bool(jnp.all(dead[out.aux_latents]))


# ---- the fast paths against their plain forms -----------------------------------


@pytest.mark.parametrize('n,k', [(4096, 32), (2048, 24), (4096, 128)])
def test_top_k_rows_bounds_keep_ties_and_infinities(n, k):
  # Integer scores (many exact ties), constant rows, rows with fewer than k
  # finite entries and rows of -inf: the masked two-stage selection must still
  # return exactly what lax.top_k returns.
  scores = jax.random.randint(jax.random.key(n + k), (B, n), -3, 4).astype(jnp.float32)
  scores = scores.at[0].set(2.0).at[1].set(-jnp.inf).at[2, :].set(-jnp.inf)
  scores = scores.at[2, 5].set(1.0).at[2, n - 1].set(3.0)
  scores = scores.at[3].set(jax.random.normal(jax.random.key(1), (n,)))
  assert rank.group_size(n, k)  # the two-stage path runs
  v1, i1 = jax.jit(lambda s: sparse.top_k_rows(s, k))(scores)
  v2, i2 = lax.top_k(scores, k)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_array_equal(v1, v2)


def test_kth_largest_key_matches_sort():
  values = jax.random.randint(jax.random.key(0), (64, 40), -5, 6).astype(jnp.float32)
  values = values.at[0, 0].set(-0.0).at[1, 1].set(jnp.inf).at[2, 2].set(-jnp.inf)
  keys = rank.sortable_keys(values)
  flat = np.sort(np.asarray(keys).ravel())[::-1]
  for count in (1, 7, 100, 2559, 2560):
    assert int(rank.kth_largest_key(keys, count)) == flat[count - 1]
  # The keys order the values.
  order = np.argsort(np.asarray(keys).ravel(), kind='stable')
  assert np.all(np.diff(np.asarray(values).ravel()[order]) >= 0)


def _encoder_pipeline(spec, dead, threshold=None):
  def loss(x, w, b, w_dec):
    out = sparse.encode_select(x, w, b, spec, aux_mask=dead, threshold=threshold)
    y = sparse.sparse_decode(jax.nn.relu(out.values), out.latents, w_dec, out.tokens,
                             spec.tuning)
    total = jnp.sum(jnp.sin(y))
    if spec.aux_k:
      total += jnp.sum(jnp.cos(sparse.sparse_decode(out.aux_values, out.aux_latents, w_dec,
                                                    tuning=spec.tuning)))
    return total, out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize('block_size,collect', [(0, True), (32, True), (32, False)])
def test_row_tiles_and_block_merges_match_one_pass(block_size, collect):
  n, k, aux_k = 128, 6, 8
  x, w, b, w_dec, _ = _inputs(n, True, seed=4)  # integer-valued: many ties
  dead = jnp.arange(n) % 3 == 0
  threshold = jnp.where(jnp.arange(n) % 2 == 0, 0.5, -0.5)
  spec = sparse.EncoderSpec(k=k, aux_k=aux_k, block_size=0)
  want = _encoder_pipeline(spec, dead)(x, w, b, w_dec)
  want_thr = _encoder_pipeline(sparse.EncoderSpec(k=k, margin=0.25), None, threshold)(
      x, w, b, w_dec)
  # Tiles of 4 rows (16 rows in all); blocks merged one by one when not collected.
  tuning = dataclasses.replace(DEFAULT_TUNING, tile_bytes=4 * 4 * 32, min_tile_rows=1,
                               max_collected=DEFAULT_TUNING.max_collected if collect else 0)
  assert tile_rows(B, block_size or n, tuning) < B
  spec = sparse.EncoderSpec(k=k, aux_k=aux_k, block_size=block_size, tuning=tuning)
  got = _encoder_pipeline(spec, dead)(x, w, b, w_dec)
  got_thr = _encoder_pipeline(sparse.EncoderSpec(k=k, margin=0.25, block_size=block_size,
                                                 tuning=tuning), None, threshold)(x, w, b, w_dec)
  for ((l1, o1), g1), ((l2, o2), g2) in ((want, got), (want_thr, got_thr)):
    np.testing.assert_array_equal(o1.latents, o2.latents)
    np.testing.assert_array_equal(o1.aux_latents, o2.aux_latents)
    _close(o1.values, o2.values)
    _close(o1.min_score, o2.min_score)
    _close_all((l1, g1), (l2, g2))


@pytest.mark.parametrize('integer', [False, True])
def test_batch_selection_with_row_tiles_matches_dense(integer):
  tuning = dataclasses.replace(DEFAULT_TUNING, tile_bytes=4 * 4 * 64, min_tile_rows=1,
                               vectorize_max_elements=3 * 6 * D)  # 3-row steps
  n, k = 64, 3
  args = _inputs(n, integer, seed=12)
  spec = sparse.EncoderSpec(k=6, batch_k_per_token=k, tuning=tuning)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  (l1, out), g1 = grad(_batch_pipeline(spec))(*args)
  (l2, mask), g2 = grad(_batch_pipeline_dense(k))(*args)
  kept = np.zeros((B, n))
  np.add.at(kept, (np.asarray(out.tokens), np.asarray(out.latents)),
            np.asarray(out.values) > 0)
  ref = np.asarray(mask) * (np.asarray(args[0] @ args[1] + args[2]) > 0)
  np.testing.assert_array_equal(kept, ref)
  _close_all((l1, g1), (l2, g2))


@pytest.mark.parametrize('size,want', [(1 << 20, 1000), (1 << 20, 300000), (4096, 100)])
def test_score_near_rank(size, want):
  scores = jax.random.normal(jax.random.key(3), (size,))
  got = float(sparse.score_near_rank(scores.reshape(64, -1), want))
  # Its rank among all the scores is off by the sampling error, about
  # sqrt(rank * stride) (exact when nothing is skipped).
  stride = rank.sample_stride(size)
  got_rank = int(jnp.sum(scores > got))
  assert abs(got_rank - want) <= 4 * (want * stride) ** 0.5 * (stride > 1), (got_rank, want)


def test_candidate_floor_keeps_the_previous_floor_when_short():
  scores = jnp.array([5.0, 4.0, 3.0, -jnp.inf])
  # Rank 2 * 3 is past every score: the smallest sample (-inf) loses to the floor.
  assert float(sparse.candidate_floor(scores, 3, floor=2.5)) == 2.5
  assert float(sparse.candidate_floor(scores, 1)) == 3.0  # rank 2
  assert float(sparse.candidate_floor(-scores, 1)) == 0.0  # never below 0


def test_zero_cotangent_skips_encoder_backward():
  # The ReLU SAEs' dense fallback gives the selection a zero cotangent.
  x, w, b, _, _ = _inputs(64, False)
  spec = sparse.EncoderSpec(k=4)
  grads = jax.grad(lambda x, w, b: 0.0 * jnp.sum(sparse.encode_select(x, w, b, spec).values),
                   argnums=(0, 1, 2))(x, w, b)
  for g, a in zip(grads, (x, w, b)):
    assert g.shape == a.shape
    np.testing.assert_array_equal(g, 0.0)


# ---- TopK's fused reconstruction term ------------------------------------------


@pytest.mark.parametrize('integer,tiles', [(False, False), (True, True)])
def test_topk_mse_matches_dense(integer, tiles):
  # Integer-valued inputs make ties common; with tiles, 4 tiles of 4 rows in
  # steps of 2 rows, so that every loop and index of the fused pass is exercised.
  n, k, aux_k = 128, 6, 8
  x, w, b, w_dec, _ = _inputs(n, integer, seed=6)
  b_dec = jax.random.normal(jax.random.key(8), (D,)) * (0.0 if integer else 0.3)
  dead = jnp.arange(n) % 3 == 0
  tuning = DEFAULT_TUNING
  if tiles:
    tuning = dataclasses.replace(DEFAULT_TUNING, tile_bytes=4 * 4 * n, min_tile_rows=1,
                                 vectorize_max_elements=2 * k * D)
    assert tile_rows(B, n, tuning) == 4
  spec = sparse.EncoderSpec(k=k, aux_k=aux_k, tuning=tuning)

  def fused(w, b, w_dec, b_dec):
    term = sparse.topk_mse(x, w, b, w_dec, b_dec, spec, aux_mask=dead)
    return term.mse, term

  def dense(w, b, w_dec, b_dec):
    x_in = x - b_dec
    pre = x_in @ w + b
    _, idx = lax.top_k(pre, k)
    x_hat = (jax.nn.relu(pre) * _dense_mask(pre, idx)) @ w_dec + b_dec
    _, aux_idx = lax.top_k(jnp.where(dead, pre, -jnp.inf), aux_k)
    return jnp.sum((x - x_hat) ** 2) / B, (x_hat, jnp.take_along_axis(pre, idx, 1), idx, aux_idx)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  (l1, term), g1 = grad(fused)(w, b, w_dec, b_dec)
  (l2, (x_hat, values, idx, aux_idx)), g2 = grad(dense)(w, b, w_dec, b_dec)
  np.testing.assert_array_equal(term.latents, idx)
  np.testing.assert_array_equal(term.aux.latents, aux_idx)
  _close(term.values, values)
  _close(term.x_hat, x_hat)
  _close_all((l1, g1), (l2, g2))
  # Without differentiation the same pass runs without the gradient.
  _close(jax.jit(lambda: sparse.topk_mse(x, w, b, w_dec, b_dec, spec, aux_mask=dead).mse)(), l2)


def test_batch_mse_matches_dense(row_ops):
  # Flat triples of a batch selection, some of them unused (-inf), against the
  # same term written densely; gradients wrt every parameter, b_dec both ways.
  n, m = 64, 3
  x, w, b, w_dec, _ = _inputs(n, False, seed=9)
  b_dec = 0.3 * jax.random.normal(jax.random.key(10), (D,))
  spec = sparse.EncoderSpec(k=6, batch_k_per_token=m, tuning=row_ops)
  kept = sparse.encode_select(x - b_dec, w, b, spec)
  kept = sparse.Kept(kept.values.at[0, 0].set(-jnp.inf), kept.latents, kept.tokens)
  mask = jnp.zeros((B, n)).at[kept.tokens, kept.latents].add(
      jnp.where(jnp.isfinite(kept.values), 1.0, 0.0))

  def fused(w, b, w_dec, b_dec):
    return sparse.batch_mse(x, w, b, w_dec, b_dec, kept, row_ops)

  def dense(w, b, w_dec, b_dec):
    pre = (x - b_dec) @ w + b
    x_hat = (jax.nn.relu(pre) * mask) @ w_dec + b_dec
    return jnp.sum((x - x_hat) ** 2) / B, x_hat

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  (l1, x_hat1), g1 = grad(fused)(w, b, w_dec, b_dec)
  (l2, x_hat2), g2 = grad(dense)(w, b, w_dec, b_dec)
  _close(x_hat1, x_hat2)
  _close_all((l1, g1), (l2, g2))


@pytest.mark.parametrize('n, blocks', [(64, 1), (64, 4), (1 << 28, 2)])
def test_triples_sorted_by_latent_within_blocks(n, blocks):
  # A permutation of the triples within each block of rows, ascending in latent
  # (in buckets of 2^c latents where latent and position need over 31 bits).
  rows, m = 16, 6
  latents = jax.random.randint(jax.random.key(0), (rows, m), 0, n, dtype=jnp.int32)
  kept = sparse.Kept(jnp.arange(rows * m, dtype=jnp.float32).reshape(rows, m), latents,
                     jnp.repeat(jnp.arange(rows, dtype=jnp.int32), m).reshape(rows, m))
  out = fused._by_latent(kept, n, blocks)
  bucket = 1 << max(0, (n - 1).bit_length() + (rows * m // blocks - 1).bit_length() - 31)
  for block in range(blocks):
    part = lambda a: np.asarray(a).reshape(blocks, -1)[block]
    order = part(out.values).astype(int)  # the original flat positions
    assert sorted(order) == list(range(block * len(order), (block + 1) * len(order)))
    np.testing.assert_array_equal(part(out.latents), np.asarray(latents).reshape(-1)[order])
    np.testing.assert_array_equal(part(out.tokens), order // m)
    assert np.all(np.diff(part(out.latents) // bucket) >= 0)


def test_batch_mse_sorts_within_row_shards():
  # Rows sharded over 'data' with sort_row_blocks = 2 shards: the same loss and
  # gradients as unsharded, and the sort runs per shard (no all-gather).
  n, m = 64, 3
  x, w, b, w_dec, _ = _inputs(n, False, seed=3)
  b_dec = 0.3 * jax.random.normal(jax.random.key(4), (D,))
  kept = sparse.encode_select(x - b_dec, w, b, sparse.EncoderSpec(k=6, batch_k_per_token=m))
  kept = sparse.Kept(kept.values, kept.latents, kept.tokens)
  tuning = dataclasses.replace(DEFAULT_TUNING, sort_row_blocks=2)
  f = jax.jit(lambda x, w, b, w_dec, b_dec, kept: jax.value_and_grad(
      lambda p: sparse.batch_mse(x, *p, kept, tuning)[0])((w, b, w_dec, b_dec)))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
  sharded = (put(x, 'data', None), put(w, None, 'model'), put(b, 'model'),
             put(w_dec, 'model', None), put(b_dec, None),
             sparse.Kept(*(put(a, 'data', None) for a in kept)))
  _close_all(f(*sharded), f(x, w, b, w_dec, b_dec, kept))
  assert 'all-gather' not in f.lower(*sharded).compile().as_text()
