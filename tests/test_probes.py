"""Linear probes: exact properties on constructed data (no language model)."""
import numpy as np
import pytest

from dictlearn.analysis import probes


def _separable(n=400, d=16, n_classes=3, seed=0):
  """Classes placed on separated means along random directions: linearly separable."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(n_classes, d)) * 4
  y = rng.integers(0, n_classes, n)
  x = centres[y] + rng.normal(size=(n, d)) * 0.3
  return x.astype(np.float32), y


def test_logistic_probe_separates_separable_classes_on_held_out_groups():
  x, y = _separable()
  groups = np.arange(len(y)) // 4  # 4 rows per "text"
  result = probes.fit_and_score(x, y, groups, kind='logistic', test_fraction=0.25)
  assert result['train'] == 1.0 and result['test'] == 1.0
  assert result['chance'] < 0.5
  assert result['n_train'] + result['n_test'] == len(y)
  assert result['n_test'] == 25 * 4  # whole groups held out


def test_logistic_probe_is_at_chance_on_random_labels():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(600, 8)).astype(np.float32)
  y = rng.integers(0, 2, 600)
  result = probes.fit_and_score(x, y, np.arange(600), kind='logistic')
  assert abs(result['test'] - 0.5) < 0.1


def test_linear_probe_recovers_a_linear_target_and_skips_unlabelled_rows():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 10)).astype(np.float32)
  w = rng.normal(size=10)
  y = x @ w + 3.0
  y[::7] = np.nan  # tokens without a label
  probe = probes.train_probe(x, y, kind='linear', steps=500, learning_rate=5e-2, l2=0.0)
  keep = ~np.isnan(y)
  np.testing.assert_allclose(probe.predict(x[keep]), y[keep], atol=0.05)
  assert probes.score(probe, x, y) > 0.999


def test_unlabelled_tokens_are_left_out_of_a_classifier():
  x, y = _separable(n=200)
  y_masked = y.copy()
  y_masked[::2] = -1
  result = probes.fit_and_score(x, y_masked, np.arange(200))
  assert result['n_train'] + result['n_test'] == 100


def test_bad_probe_input_is_named():
  x, y = _separable(n=20)
  with pytest.raises(ValueError, match='Unknown probe kind'):
    probes.train_probe(x, y, kind='svm')
  with pytest.raises(ValueError, match=r'expected \(n, d\) and \(n,\)'):
    probes.train_probe(x, y[:-1])
  with pytest.raises(ValueError, match='no labelled row'):
    probes.train_probe(x, np.full(20, -1))
  with pytest.raises(ValueError, match='outside the 2 classes'):
    probes.train_probe(x, y, n_classes=2)
  with pytest.raises(ValueError, match='at least two groups'):
    probes.fit_and_score(x, y, np.zeros(20))
  probe = probes.train_probe(x, y, steps=5)
  with pytest.raises(ValueError, match=r'expected \(n, 16\)'):
    probe.predict(x[:, :8])
