"""Linear probes on activations: logistic or linear regression, trained with optax.

A probe reads a label off one site's activation at each token: rows `x` (n, d),
labels `y` (n,), one row per labelled token. Labels are per token, so a text
contributes as many rows as it has labelled tokens; a label of -1 (classes) or
NaN (regression) marks a token without one, left out. Held-out accuracy is
measured on whole groups (texts) kept out of training, so that tokens of one text
never sit on both sides:

    result = fit_and_score(x, y, groups, kind='logistic')    # {'test_accuracy': ...}
    per_layer = {site: fit_and_score(acts[site], y, groups) for site in sites}

Training is full-batch Adam on the standardised rows (each feature scaled by its
training mean and deviation), with an L2 penalty on the weights; one program is
compiled per (rows, width, classes, steps), so probes of every layer of a model
share it.
"""
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

KINDS = ('logistic', 'linear')


@dataclasses.dataclass(frozen=True)
class Probe:
  """A trained linear probe.

  Attributes:
    kind: 'logistic' (classes) or 'linear' (a real value).
    weights: (d, n_classes) for logistic, (d, 1) for linear, on standardised rows.
    bias: (n_classes,) or (1,).
    mean, scale: (d,) the standardisation of the training rows.
  """
  kind: str
  weights: np.ndarray
  bias: np.ndarray
  mean: np.ndarray
  scale: np.ndarray

  def scores(self, x: np.ndarray) -> np.ndarray:
    """Logits (n, n_classes) or values (n,)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
      raise ValueError(f'Probe rows have shape {x.shape}; expected (n, {self.mean.shape[0]}).')
    out = ((x - self.mean) / self.scale) @ self.weights + self.bias
    return out[:, 0] if self.kind == 'linear' else out

  def predict(self, x: np.ndarray) -> np.ndarray:
    """Classes (n,) int or values (n,) float."""
    s = self.scores(x)
    return s if self.kind == 'linear' else np.argmax(s, axis=1)


def _check(x, y, kind):
  if kind not in KINDS:
    raise ValueError(f'Unknown probe kind {kind!r}; expected one of {KINDS}.')
  x = np.asarray(x, np.float32)
  y = np.asarray(y)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f'Probe data: rows of shape {x.shape} and labels of shape {y.shape}; expected '
                     '(n, d) and (n,).')
  keep = ~np.isnan(y.astype(np.float64)) if kind == 'linear' else y >= 0
  if not keep.any():
    raise ValueError('Probe data: no labelled row (every label is -1 or NaN); expected some.')
  return x[keep], y[keep], keep


@functools.partial(jax.jit, static_argnames=('kind', 'n_out', 'steps'))
def _train(x, y, key, learning_rate, l2, *, kind, n_out, steps):
  d = x.shape[1]
  params = {'w': jax.random.normal(key, (d, n_out)) * 0.01 / np.sqrt(d),
            'b': jnp.zeros((n_out,))}
  opt = optax.adam(learning_rate)

  def loss_fn(p):
    out = x @ p['w'] + p['b']
    if kind == 'logistic':
      data = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    else:
      data = jnp.mean((out[:, 0] - y) ** 2)
    return data + l2 * jnp.sum(p['w'] ** 2)

  def step(_, carry):
    p, state = carry
    grads = jax.grad(loss_fn)(p)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
  return params, loss_fn(params)


def train_probe(x: np.ndarray, y: np.ndarray, *, kind: str = 'logistic',
                n_classes: Optional[int] = None, steps: int = 300,
                learning_rate: float = 1e-2, l2: float = 1e-3, seed: int = 0) -> Probe:
  """Fits a linear probe by full-batch Adam.

  Args:
    x: (n, d) rows.
    y: (n,) int classes (-1: no label) for 'logistic'; float values (NaN: none)
      for 'linear'.
    kind: 'logistic' or 'linear'.
    n_classes: classes of a logistic probe; default max(y) + 1.
    steps: Adam steps on the whole set.
    learning_rate: Adam's step size.
    l2: weight of the squared-weight penalty.
    seed: initialisation seed.

  Raises:
    ValueError: an unknown kind, mismatched shapes, no labelled row, or a class
      outside [0, n_classes).
  """
  x, y, _ = _check(x, y, kind)
  if kind == 'logistic':
    y = y.astype(np.int32)
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    if y.max() >= n_classes:
      raise ValueError(f'Label {y.max()} is outside the {n_classes} classes [0, {n_classes}).')
  mean = x.mean(axis=0)
  scale = x.std(axis=0) + 1e-6
  xs = (x - mean) / scale
  n_out = n_classes if kind == 'logistic' else 1
  params, _ = _train(jnp.asarray(xs), jnp.asarray(y if kind == 'logistic' else y.astype(np.float32)),
                     jax.random.PRNGKey(seed), jnp.float32(learning_rate), jnp.float32(l2),
                     kind=kind, n_out=n_out, steps=int(steps))
  return Probe(kind, np.asarray(params['w']), np.asarray(params['b']), mean, scale)


def score(probe: Probe, x: np.ndarray, y: np.ndarray) -> float:
  """Accuracy (logistic) or R^2 (linear) on the labelled rows."""
  x, y, _ = _check(x, y, probe.kind)
  pred = probe.predict(x)
  if probe.kind == 'logistic':
    return float(np.mean(pred == y))
  resid = np.sum((pred - y) ** 2)
  total = np.sum((y - y.mean()) ** 2)
  return float(1.0 - resid / max(total, np.finfo(np.float64).tiny))


def split_groups(groups: np.ndarray, test_fraction: float, seed: int = 0) -> np.ndarray:
  """A boolean test mask over rows holding out `test_fraction` of the distinct groups.

  Raises:
    ValueError: fewer than two groups, or a fraction outside (0, 1).
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}.')
  groups = np.asarray(groups)
  distinct = np.unique(groups)
  if len(distinct) < 2:
    raise ValueError(f'Held-out scoring needs at least two groups (texts), got {len(distinct)}.')
  n_test = min(max(1, int(round(test_fraction * len(distinct)))), len(distinct) - 1)
  test = np.random.default_rng(seed).choice(distinct, n_test, replace=False)
  return np.isin(groups, test)


def fit_and_score(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *,
                  kind: str = 'logistic', test_fraction: float = 0.25, seed: int = 0,
                  n_classes: Optional[int] = None, **train_kwargs) -> dict:
  """Trains on some groups' rows, scores on the held-out groups' rows.

  Args:
    x: (n, d) rows; y: (n,) labels (-1 / NaN: none); groups: (n,) the text of
      each row (held out whole).
    kind: 'logistic' or 'linear'.
    test_fraction: share of groups held out.
    seed: split and initialisation seed.
    n_classes: logistic classes; default the labels' max + 1 over all rows.
    **train_kwargs: passed to `train_probe` (steps, learning_rate, l2).

  Returns:
    {'train': accuracy or R^2 on training rows, 'test': on held-out rows,
     'chance': the held-out share of the most frequent training class (logistic)
     or 0 (linear: R^2 of the training mean), 'n_train', 'n_test': rows}.
  """
  x, y, keep = _check(x, y, kind)
  groups = np.asarray(groups)[keep]
  test = split_groups(groups, test_fraction, seed)
  if kind == 'logistic' and n_classes is None:
    n_classes = int(y.max()) + 1
  probe = train_probe(x[~test], y[~test], kind=kind, n_classes=n_classes, seed=seed,
                      **train_kwargs)
  chance = 0.0
  if kind == 'logistic':
    majority = np.bincount(y[~test].astype(int), minlength=n_classes).argmax()
    chance = float(np.mean(y[test] == majority))
  return {'train': score(probe, x[~test], y[~test]), 'test': score(probe, x[test], y[test]),
          'chance': chance, 'n_train': int((~test).sum()), 'n_test': int(test.sum())}
