"""Synthetic activations with a known dictionary in superposition (ground truth).

Each row is `x = sum_i c_i d_i + noise`: `d_i` are `n_true` random unit directions
in `d_model` dimensions (more directions than dimensions: superposition); feature
`i` fires independently with probability `p_i = c * (i + 1) ** -power_law_exponent`,
`c` chosen so that `sum_i p_i = mean_active` (the mean number of active features
per row); a firing feature's coefficient is uniform on [0.5, 1.5] (bounded away from
0, so every firing is a visible component of the row; mean 1); the noise is
isotropic Gaussian with std `noise_std` per dimension.

Rows are generated in batches of `batch_rows`; batch `k` depends only on
(seed, k), so generation is deterministic, memory-bounded and resumable.
"""
import logging

import numpy as np
import scipy.sparse

from dictlearn.data import store

GENERATOR_VERSION = 1
MAGNITUDES = 'uniform[0.5, 1.5]'
TRUE_DICTIONARY = 'true_dictionary'


class SyntheticGenerator:
  """Batches of synthetic activations and their true sparse coefficients.

  Attributes:
    dictionary: float32 [n_true, d_model], unit rows.
    firing_probabilities: float64 [n_true], summing to `mean_active`.
  """

  def __init__(self, *, n_true, d_model, mean_active, power_law_exponent, noise_std, seed):
    """Builds the true dictionary and firing probabilities.

    Raises:
      ValueError: a non-positive size, or a `mean_active` that the power law can
        only reach with a firing probability above 1.
    """
    if n_true <= 0 or d_model <= 0 or mean_active <= 0 or noise_std < 0:
      raise ValueError(f'synthetic data: need n_true, d_model, mean_active > 0 and noise_std >= 0; '
                       f'got n_true={n_true}, d_model={d_model}, mean_active={mean_active}, '
                       f'noise_std={noise_std}')
    self.n_true, self.d_model = int(n_true), int(d_model)
    self.mean_active, self.noise_std, self.seed = float(mean_active), float(noise_std), int(seed)
    self.power_law_exponent = float(power_law_exponent)
    rng = np.random.default_rng([self.seed, 0])
    d = rng.standard_normal((self.n_true, self.d_model))
    self.dictionary = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    weights = np.arange(1, self.n_true + 1, dtype=np.float64) ** -self.power_law_exponent
    self.firing_probabilities = weights * (self.mean_active / weights.sum())
    if self.firing_probabilities.max() > 1:
      raise ValueError(
          f'synthetic data: mean_active={mean_active} with power_law_exponent={power_law_exponent} '
          f'and n_true={n_true} gives feature 0 a firing probability of '
          f'{self.firing_probabilities.max():.3f} > 1; lower mean_active or the exponent, '
          'or raise n_true')

  def batch(self, index, rows):
    """Batch `index` of `rows` rows: a pure function of (seed, index, rows).

    Returns:
      (activations float32 [rows, d_model], coefficients scipy.sparse.csr_array
      float32 [rows, n_true]).
    """
    rng = np.random.default_rng([self.seed, 1, int(index)])
    # Feature i fires on Binomial(rows, p_i) rows chosen uniformly: the same law as
    # independent Bernoulli(p_i) per row, at O(active) cost instead of O(rows * n_true).
    counts = rng.binomial(rows, self.firing_probabilities)
    row_ids = np.concatenate([rng.choice(rows, size=k, replace=False) for k in counts])
    values = rng.uniform(0.5, 1.5, size=len(row_ids)).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    coefficients = scipy.sparse.csc_array((values, row_ids, indptr),
                                          shape=(rows, self.n_true)).tocsr()
    x = np.asarray(coefficients @ self.dictionary, dtype=np.float32)
    if self.noise_std > 0:
      x += self.noise_std * rng.standard_normal(x.shape, dtype=np.float32)
    return x, coefficients

  def corpus(self, batch_rows):
    """The manifest's `corpus` entry: everything that determines the rows."""
    return {'kind': 'synthetic', 'generator_version': GENERATOR_VERSION, 'n_true': self.n_true,
            'd_model': self.d_model, 'mean_active': self.mean_active,
            'power_law_exponent': self.power_law_exponent, 'noise_std': self.noise_std,
            'seed': self.seed, 'magnitudes': MAGNITUDES, 'batch_rows': int(batch_rows)}


def write_synthetic_store(path, *, n_true, d_model, n_tokens, mean_active, power_law_exponent,
                          noise_std, seed, batch_rows=16384, dtype='float32', chunk_rows=None):
  """Writes a synthetic activation store and its true dictionary; idempotent, resumable.

  A finished store with the same parameters is left as it is; an unfinished one
  with the same parameters is resumed.

  Args:
    path: store path or URL.
    n_true, d_model, mean_active, power_law_exponent, noise_std, seed: see the module doc.
    n_tokens: rows to generate.
    batch_rows: rows generated at once (bounds memory; part of what determines the rows).
    dtype: stored activation dtype, 'float32' or 'bfloat16'.
    chunk_rows: store chunk rows; None = the store's default.

  Returns:
    `path`.

  Raises:
    ValueError: the path holds a store generated with other parameters.
  """
  gen = SyntheticGenerator(n_true=n_true, d_model=d_model, mean_active=mean_active,
                           power_law_exponent=power_law_exponent, noise_std=noise_std, seed=seed)
  corpus = gen.corpus(batch_rows)
  manifest, progress = store.read_status(path)
  previous = manifest or (progress and progress['metadata'])
  if previous is not None:
    found_n = manifest['n_tokens'] if manifest else (previous.get('extra') or {}).get('n_tokens')
    if (previous.get('model'), previous.get('corpus'), found_n) != ('synthetic', corpus, n_tokens):
      raise ValueError(f'store at {path} holds other data: model {previous.get("model")!r}, '
                       f'corpus {previous.get("corpus")}, n_tokens {found_n}; expected synthetic '
                       f'corpus {corpus} with n_tokens {n_tokens}; use another path or delete it')
    if manifest is not None:
      logging.info('synthetic store at %s already complete; reusing it', path)
      return path
  store.write_side_array(path, TRUE_DICTIONARY, gen.dictionary)
  writer = store.StoreWriter(path, d_model, dtype, chunk_rows=chunk_rows, metadata={
      'model': 'synthetic', 'site': 'synthetic', 'tokenizer': None, 'corpus': corpus,
      'extra': {'n_tokens': int(n_tokens)}})
  start = writer.n_rows
  for k in range(start // batch_rows, -(-n_tokens // batch_rows)):
    rows = min(batch_rows, n_tokens - k * batch_rows)
    x, _ = gen.batch(k, rows)
    writer.append(x[start - k * batch_rows:] if k * batch_rows < start else x)
  writer.finish()
  logging.info('synthetic store at %s: %d rows of d_model=%d from %d true directions',
               path, n_tokens, d_model, n_true)
  return path


def load_true_dictionary(path):
  """The true dictionary [n_true, d_model] (unit rows) of a synthetic store."""
  return store.read_side_array(path, TRUE_DICTIONARY)


def recovered_fraction(true_dict, learned_dec, threshold=0.9):
  """Fraction of true directions matched by some learned decoder row.

  Args:
    true_dict: [n_true, d_model] true directions.
    learned_dec: [n_latents, d_model] learned decoder rows (any norms; zero rows never match).
    threshold: minimum cosine similarity that counts as recovered.

  Returns:
    The fraction of true rows whose max cosine with a learned row is >= threshold.
  """
  def unit(a):
    a = np.asarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

  t, l = unit(true_dict), unit(learned_dec)
  if t.shape[1] != l.shape[1]:
    raise ValueError(f'recovered_fraction: true dictionary has d_model={t.shape[1]}, learned '
                     f'decoder has {l.shape[1]}')
  best = np.full(len(t), -np.inf, dtype=np.float32)
  for i in range(0, len(l), 8192):  # bounds the [n_true, block] cosine matrix
    best = np.maximum(best, (t @ l[i:i + 8192].T).max(axis=1))
  return float((best >= threshold).mean())
