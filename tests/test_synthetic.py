"""Synthetic ground-truth data: determinism, power-law firing, stores, recovery metric."""
import uuid

import numpy as np
import pytest

from dictlearn.data import store
from dictlearn.data import synthetic

ARGS = dict(n_true=64, d_model=16, mean_active=4.0, power_law_exponent=1.0, noise_std=0.0)


def _path():
  return f'memory://{uuid.uuid4().hex}'


def test_generator_is_deterministic():
  a = synthetic.SyntheticGenerator(**ARGS, seed=3)
  b = synthetic.SyntheticGenerator(**ARGS, seed=3)
  c = synthetic.SyntheticGenerator(**ARGS, seed=4)
  np.testing.assert_array_equal(a.dictionary, b.dictionary)
  np.testing.assert_allclose(np.linalg.norm(a.dictionary, axis=1), 1, rtol=1e-6)
  np.testing.assert_array_equal(a.batch(5, 100)[0], b.batch(5, 100)[0])
  assert not np.array_equal(a.batch(5, 100)[0], a.batch(6, 100)[0])
  assert not np.array_equal(a.dictionary, c.dictionary)
  x, coef = a.batch(0, 50)
  np.testing.assert_allclose(x, coef.toarray() @ a.dictionary, rtol=1e-5, atol=1e-6)
  noisy = synthetic.SyntheticGenerator(**dict(ARGS, noise_std=0.1), seed=3).batch(0, 50)[0]
  np.testing.assert_allclose((noisy - x).std(), 0.1, rtol=0.1)


def test_firing_follows_the_power_law():
  gen = synthetic.SyntheticGenerator(**ARGS, seed=0)
  p = gen.firing_probabilities
  np.testing.assert_allclose(p.sum(), 4.0)
  np.testing.assert_allclose(p[0] / p[9], 10.0)  # (i + 1) ** -1
  rows = 40000
  _, coef = gen.batch(0, rows)
  active = coef.toarray() > 0
  np.testing.assert_allclose(active.sum(1).mean(), 4.0, rtol=0.02)  # mean_active
  freq = active.mean(0)
  # Within 5 binomial standard deviations of p_i, for every feature.
  assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / rows) + 1e-12)
  slope = np.polyfit(np.log(np.arange(1, 65)), np.log(freq), 1)[0]
  assert abs(slope + 1.0) < 0.05
  values = coef.data
  assert values.min() >= 0.5 and values.max() <= 1.5


def test_impossible_mean_active_is_an_error():
  with pytest.raises(ValueError, match='firing probability of .* > 1'):
    synthetic.SyntheticGenerator(**dict(ARGS, mean_active=30.0), seed=0)


def test_store_is_deterministic_idempotent_and_keeps_the_dictionary():
  kw = dict(ARGS, n_tokens=1000, seed=7, batch_rows=300, chunk_rows=64)
  a, b = synthetic.write_synthetic_store(_path(), **kw), synthetic.write_synthetic_store(_path(), **kw)
  ra, rb = store.StoreReader(a), store.StoreReader(b)
  np.testing.assert_array_equal(ra.read_rows(0, 1000), rb.read_rows(0, 1000))
  gen = synthetic.SyntheticGenerator(**ARGS, seed=7)
  np.testing.assert_array_equal(ra.read_rows(300, 600), gen.batch(1, 300)[0])
  np.testing.assert_array_equal(synthetic.load_true_dictionary(a), gen.dictionary)
  assert (ra.manifest['model'], ra.manifest['site']) == ('synthetic', 'synthetic')
  assert ra.manifest['corpus']['n_true'] == 64
  assert synthetic.write_synthetic_store(a, **kw) == a  # already complete: reused
  with pytest.raises(ValueError, match='holds other data'):
    synthetic.write_synthetic_store(a, **dict(kw, seed=8))


def test_store_resumes_after_a_crash(monkeypatch):
  kw = dict(ARGS, n_tokens=1000, seed=7, batch_rows=100, chunk_rows=32)
  path, calls = _path(), []
  original = synthetic.SyntheticGenerator.batch

  def crashing(self, index, rows):
    calls.append(index)
    if len(calls) == 7:
      raise KeyboardInterrupt('killed')
    return original(self, index, rows)

  monkeypatch.setattr(synthetic.SyntheticGenerator, 'batch', crashing)
  with pytest.raises(KeyboardInterrupt):
    synthetic.write_synthetic_store(path, **kw)
  monkeypatch.setattr(synthetic.SyntheticGenerator, 'batch', original)
  assert store.read_status(path)[1]['n_rows'] == 512  # 32 * 16-chunk shards committed
  synthetic.write_synthetic_store(path, **kw)
  fresh = synthetic.write_synthetic_store(_path(), **kw)
  np.testing.assert_array_equal(store.StoreReader(path).read_rows(0, 1000),
                                store.StoreReader(fresh).read_rows(0, 1000))


def test_recovered_fraction():
  true = synthetic.SyntheticGenerator(**ARGS, seed=0).dictionary
  assert synthetic.recovered_fraction(true, true) == 1.0
  rng = np.random.default_rng(0)
  learned = 3.0 * true[rng.permutation(64)] + 0.01 * rng.standard_normal(true.shape)
  assert synthetic.recovered_fraction(true, learned) == 1.0  # order and norm do not matter
  assert synthetic.recovered_fraction(true, learned[:32]) == 0.5
  assert synthetic.recovered_fraction(true, rng.standard_normal((256, 16))) < 0.05
  with pytest.raises(ValueError, match='d_model=16'):
    synthetic.recovered_fraction(true, np.ones((4, 8)))
