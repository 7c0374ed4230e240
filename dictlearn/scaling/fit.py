"""Fitting a scaling law honestly: robust estimate, bootstrap, hold-out validation, plan.

The estimator is Hoffmann et al.'s (2022) Approach 3 as re-done by Besiroglu et
al. (2024), "Chinchilla Scaling: A replication attempt":

  * positive coefficients are fitted through their logs and predictions are made
    in log space (`laws.Law`);
  * the objective is a robust penalty of the log residuals, Huber (delta = 1e-3
    by default), least squares or least absolute deviation, summed (or averaged)
    over the data points;
  * L-BFGS-B (scipy) with jax gradients from many starts of a grid (Hoffmann's
    grid for the Chinchilla form), then a tight polish of the best few, run in
    a basis that whitens the law's Jacobian (collinear parameters such as
    OpenAI's beta_n, beta_k and gamma otherwise cost hundreds of iterations).

Besiroglu et al. traced Hoffmann's published fit to an optimiser that stopped
early because the averaged objective was tiny. Here every local fit optimises
the objective divided by its value at the start, so the optimiser sees the same
function whether the penalties are summed or averaged (or the loss measured in
other units), and the polish runs to a gradient of 1e-10 on that scale, or
until not even a 1e-15 relative decrease is left (float64's floor).

Uncertainty comes from a bootstrap over runs (clusters when `groups` is given),
each replicate polished from the full-data estimate (in the same whitened
basis) and refitted from the runner-up local minimum and the best grid points
for that replicate. Every derived quantity
(exponents, compute-optimal sizes, predicted losses) is computed for each
replicate and reported as a percentile interval.
"""
import contextlib
import ctypes
import dataclasses
import functools
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dictlearn.scaling import laws as laws_lib

LOSSES = ('huber', 'l2', 'l1')
REDUCTIONS = ('sum', 'mean')
DEFAULT_TARGETS = (1e6, 4e6, 16e6, 34e6)
# |correlation| of two parameters across the bootstrap above which they are flagged.
CORRELATION_WARNING = 0.95
# Least absolute deviation is optimised as Huber with this tiny delta (divided by
# it): the same minimiser to within ~1e-6 in log loss, but differentiable.
_L1_SMOOTHING = 1e-6
# Tolerances, in units of the objective divided by its value at the start.
_SCREEN_GTOL, _SCREEN_MAXITER = 1e-8, 2000
_POLISH_GTOL, _POLISH_FTOL, _POLISH_MAXITER = 1e-10, 1e-15, 10000
_CONVERGED_GRAD = 1e-6
_POLISH_RESTARTS = 3
_POSITIVE_INPUTS = ('n_latents', 'tokens', 'k')

Array = np.ndarray


# ---- BLAS threads ------------------------------------------------------------
# L-BFGS-B does its small linear algebra through scipy's OpenBLAS, whose thread
# pool costs milliseconds per call on a busy machine (measured: 3 ms per
# iteration on 2 shared cores, 4 us with one thread) for 5x5 problems. The fits
# therefore pin OpenBLAS to one thread, through the same C entry points that
# threadpoolctl uses, and restore it afterwards.

_OPENBLAS_SYMBOLS = (('scipy_openblas_get_num_threads', 'scipy_openblas_set_num_threads'),
                     ('scipy_openblas_get_num_threads64_', 'scipy_openblas_set_num_threads64_'),
                     ('openblas_get_num_threads', 'openblas_set_num_threads'),
                     ('openblas_get_num_threads64_', 'openblas_set_num_threads64_'))


@functools.lru_cache(maxsize=1)
def _openblas_controls() -> tuple[tuple[Any, Any], ...]:
  """(get, set) thread-count functions of every OpenBLAS loaded in this process."""
  try:
    with open('/proc/self/maps') as f:
      paths = sorted({line.split()[-1] for line in f if 'openblas' in line.lower()})
  except OSError:  # not Linux: leave BLAS alone
    return ()
  controls = []
  for path in paths:
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for get_name, set_name in _OPENBLAS_SYMBOLS:
      if hasattr(lib, get_name) and hasattr(lib, set_name):
        controls.append((getattr(lib, get_name), getattr(lib, set_name)))
        break
  return tuple(controls)


@contextlib.contextmanager
def _one_blas_thread():
  controls = _openblas_controls()
  before = [get() for get, _ in controls]
  for _, set_threads in controls:
    set_threads(1)
  try:
    yield
  finally:
    for (_, set_threads), n in zip(controls, before):
      set_threads(n)


# ---- objective ---------------------------------------------------------------

def _penalty(loss: str, delta: float):
  if loss == 'l2':
    return lambda r: 0.5 * r * r
  d = _L1_SMOOTHING if loss == 'l1' else delta
  scale = 1.0 / d if loss == 'l1' else 1.0

  def huber(r):
    a = jnp.abs(r)
    return scale * jnp.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d))
  return huber


@functools.lru_cache(maxsize=32)
def _objective_fns(law: laws_lib.Law, loss: str, delta: float, reduction: str):
  """Jitted objective: value_and_grad for one theta, and values for a batch of thetas."""
  rho = _penalty(loss, delta)

  def objective(theta, inputs, log_y, weights):
    total = jnp.sum(weights * rho(law.log_loss(theta, inputs) - log_y))
    return total / jnp.sum(weights) if reduction == 'mean' else total

  value_and_grad = jax.jit(jax.value_and_grad(objective))
  batch = jax.jit(jax.vmap(objective, (0, None, None, None)))
  return value_and_grad, batch


@functools.lru_cache(maxsize=32)
def _jacobian_fn(law: laws_lib.Law):
  """Jitted d log L / d theta at every point, `[n_points, n_params]`."""
  return jax.jit(jax.jacfwd(law.log_loss))


@dataclasses.dataclass
class _Problem:
  """One data set to fit: the law, the penalty and the (weighted) points."""
  law: laws_lib.Law
  inputs: dict[str, Array]
  log_y: Array
  loss: str
  delta: float
  reduction: str

  def fns(self):
    return _objective_fns(self.law, self.loss, self.delta, self.reduction)

  def values(self, thetas: Array, weights: Array, chunk: int = 256) -> Array:
    """Objective at many parameter vectors (NaN mapped to inf)."""
    _, batch = self.fns()
    out = []
    m = len(thetas)
    # Fixed-size chunks (the last padded) so that the batch compiles once.
    padded = np.concatenate([thetas, np.repeat(thetas[:1], -m % chunk, axis=0)])
    with jax.enable_x64(True):
      for i in range(0, m, chunk):
        try:
          out.append(np.asarray(batch(padded[i:i + chunk], self.inputs, self.log_y, weights)))
        except jax.errors.TracerArrayConversionError as e:
          raise TypeError(f'law {self.law.name!r}: log_predict must be written with jax.numpy '
                          '(it is traced and differentiated by jax), not numpy') from e
    values = np.concatenate(out)[:m] if out else np.zeros(0)
    return np.where(np.isfinite(values), values, np.inf)

  def whitening(self, theta: Array) -> Array:
    """A basis B in which the law is locally well conditioned: B^T J^T J B = n I.

    J is the Jacobian of the log-predictions at `theta`. Forms such as OpenAI's
    L(n, k), whose parameters multiply strongly collinear features (ln n, ln k,
    ln k ln n), take hundreds of L-BFGS iterations from a warm start in the raw
    parameters and tens in the whitened ones.
    """
    with jax.enable_x64(True):
      jac = np.asarray(_jacobian_fn(self.law)(jnp.asarray(theta), self.inputs))
    eigval, eigvec = np.linalg.eigh(jac.T @ jac / len(jac))
    eigval = np.maximum(eigval, 1e-12 * max(eigval.max(), 1e-300))
    return eigvec / np.sqrt(eigval)

  def local_fit(self, theta0: Array, weights: Array, polish: bool,
                basis: Array | None = None) -> tuple[Array, float, bool]:
    """L-BFGS-B from `theta0` on the objective divided by its value there.

    Args:
      theta0: the start.
      weights: weight of each point.
      polish: tight tolerances (else the screening ones).
      basis: optional `[n_params, n_params]` matrix B; the fit then runs over z
        with theta = theta0 + B z (see `whitening`).

    Returns:
      (theta, objective, converged).
    """
    value_and_grad, _ = self.fns()
    with jax.enable_x64(True):
      # Device arrays once per fit: converting them on every call costs as much as the call.
      inputs = {key: jnp.asarray(v) for key, v in self.inputs.items()}
      log_y, weights = jnp.asarray(self.log_y), jnp.asarray(weights)

      def raw(theta):
        v, g = value_and_grad(theta, inputs, log_y, weights)
        return float(v), np.asarray(g, dtype=np.float64)

      f0, _ = raw(theta0)
      if not np.isfinite(f0):
        return theta0, math.inf, False
      scale = f0 if f0 > 0 else 1.0

      theta0 = np.asarray(theta0, dtype=np.float64)
      basis = np.eye(theta0.size) if basis is None else basis
      to_theta = lambda z: theta0 + basis @ z

      def scaled(z):
        v, g = raw(to_theta(z))
        if not (np.isfinite(v) and np.all(np.isfinite(g))):
          return math.inf, np.zeros_like(z)
        return v / scale, basis.T @ g / scale

      if polish:
        options = dict(gtol=_POLISH_GTOL, ftol=_POLISH_FTOL, maxiter=_POLISH_MAXITER, maxls=50)
      else:
        options = dict(gtol=_SCREEN_GTOL, maxiter=_SCREEN_MAXITER)
      z, stalled = np.zeros_like(theta0), False
      for _ in range(_POLISH_RESTARTS if polish else 1):
        res = scipy.optimize.minimize(scaled, z, jac=True, method='L-BFGS-B', options=options)
        if res.success:
          break
        # A failed line search near the optimum: restart with a fresh L-BFGS
        # memory; if that cannot lower the objective either, it is at the floor.
        stalled = res.fun >= scaled(z)[0] - 1e-13 * abs(res.fun)
        z = res.x
        if stalled:
          break
      value, grad = scaled(res.x)
    # Converged: the gradient test passed, or no decrease of 1e-15 relative is left
    # (near a least-absolute-deviation-like optimum the gradient cannot shrink
    # further in float64; that stop is legitimate because the objective is scaled).
    converged = bool(np.isfinite(value) and (res.success or stalled
                                             or np.max(np.abs(grad)) < _CONVERGED_GRAD))
    return to_theta(res.x), value * scale, converged


def _distinct(thetas: Array, values: Array, limit: int, tol: float = 1e-3) -> list[int]:
  """Indices of up to `limit` best end points, skipping near-duplicates.

  A duplicate is within `tol` in every parameter, or within 1e-7 relative in
  objective (the same flat valley).
  """
  chosen: list[int] = []
  for i in np.argsort(values):
    if not np.isfinite(values[i]):
      break
    if all(np.max(np.abs(thetas[i] - thetas[j])) > tol
           and abs(values[i] - values[j]) > 1e-7 * abs(values[j]) for j in chosen):
      chosen.append(int(i))
    if len(chosen) == limit:
      break
  return chosen


@dataclasses.dataclass
class PointFit:
  """A multi-start estimate.

  Attributes:
    theta: the best parameter vector (raw: log coefficients, exponents).
    objective: the objective there (summed or averaged penalties).
    converged: the polish converged (a vanishing gradient, or no relative
      decrease of 1e-15 left).
    minima: distinct local minima found, best first, `[m, n_params]`.
    minima_objective: their objective values.
    screened: the grid points ranked best by the objective at the start, best first.
    n_starts: local fits run.
  """
  theta: Array
  objective: float
  converged: bool
  minima: Array
  minima_objective: Array
  screened: Array
  n_starts: int


def _choose_starts(grid: Array, values: Array, n_starts: int | None,
                   rng: np.random.Generator) -> Array:
  """All grid points, or the best half of `n_starts` by objective plus a random rest."""
  order = np.argsort(values, kind='stable')
  if n_starts is None or n_starts >= len(grid):
    return grid[order]
  best = order[:max(1, n_starts // 2)]
  rest = rng.choice(order[len(best):], size=n_starts - len(best), replace=False)
  return grid[np.concatenate([best, rest])]


def _multistart(problem: _Problem, weights: Array, grid: Array, n_starts: int | None,
                rng: np.random.Generator, n_polish: int = 3) -> PointFit:
  values = problem.values(grid, weights)
  if not np.any(np.isfinite(values)):
    raise ValueError(f'the {problem.law.name!r} objective is not finite at any grid point; '
                     'check the inputs and the grid for values that overflow')
  starts = _choose_starts(grid, values, n_starts, rng)
  ends = [problem.local_fit(s, weights, polish=False) for s in starts]
  thetas = np.array([e[0] for e in ends])
  objs = np.array([e[1] for e in ends])
  polished = [problem.local_fit(thetas[i], weights, polish=True,
                                basis=problem.whitening(thetas[i]))
              for i in _distinct(thetas, objs, n_polish)]
  theta, objective, converged = min(polished, key=lambda p: p[1])
  all_thetas = np.concatenate([np.array([p[0] for p in polished]), thetas])
  all_objs = np.concatenate([np.array([p[1] for p in polished]), objs])
  keep = _distinct(all_thetas, all_objs, 8)
  screened = grid[np.argsort(values, kind='stable')[:64]]
  return PointFit(theta=theta, objective=objective, converged=converged,
                  minima=all_thetas[keep], minima_objective=all_objs[keep],
                  screened=screened, n_starts=len(starts))


# ---- input checks ------------------------------------------------------------

def _check_inputs(law: laws_lib.Law, inputs: Mapping[str, Any], y: Any,
                  groups: Any) -> tuple[dict[str, Array], Array, Array | None]:
  missing = [name for name in law.inputs if name not in inputs]
  if missing:
    raise ValueError(f'law {law.name!r} needs inputs {list(law.inputs)}; missing {missing}, '
                     f'present {sorted(inputs)}')
  y = np.asarray(y, dtype=np.float64).reshape(-1)
  x = {}
  for name in law.inputs:
    v = np.asarray(inputs[name], dtype=np.float64).reshape(-1)
    if v.shape != y.shape:
      raise ValueError(f'input {name!r} has {v.size} values but the target has {y.size}')
    # Sizes, tokens and k enter the built-in laws through their logs.
    positive = name in _POSITIVE_INPUTS
    bad = ~np.isfinite(v) | ((v <= 0) if positive else False)
    if bad.any():
      what = 'finite and positive (its log is taken)' if positive else 'finite'
      raise ValueError(f'input {name!r} must be {what}; {bad.sum()} values are not, e.g. '
                       f'{v[bad][:3].tolist()} at rows {np.flatnonzero(bad)[:3].tolist()}')
    x[name] = v
  bad = ~np.isfinite(y) | (y <= 0)
  if bad.any():
    raise ValueError(f'the target (loss) must be finite and positive, since it is fitted in log '
                     f'space; {bad.sum()} values are not, e.g. {y[bad][:3].tolist()} at rows '
                     f'{np.flatnonzero(bad)[:3].tolist()}')
  if groups is not None:
    groups = np.asarray(groups).reshape(-1)
    if groups.shape != y.shape:
      raise ValueError(f'groups has {groups.size} values but the target has {y.size}')
  units = y.size if groups is None else len(np.unique(groups))
  if units <= law.n_params:
    what = 'runs' if groups is None else 'groups (bootstrap clusters)'
    raise ValueError(f'too few runs: {units} {what} for law {law.name!r} with {law.n_params} '
                     f'parameters {list(law.params)}; need at least {law.n_params + 1}')
  return x, y, groups


def _check_settings(loss: str, delta: float, reduction: str, level: float, n_boot: int,
                    holdout: float):
  if loss not in LOSSES:
    raise ValueError(f'unknown loss {loss!r}; expected one of {LOSSES}')
  if reduction not in REDUCTIONS:
    raise ValueError(f'unknown reduction {reduction!r}; expected one of {REDUCTIONS}')
  if not delta > 0:
    raise ValueError(f'Huber delta must be > 0, got {delta}')
  if not 0 < level < 1:
    raise ValueError(f'interval level must be in (0, 1), got {level}')
  if n_boot < 0:
    raise ValueError(f'n_boot must be >= 0, got {n_boot}')
  if not 0 <= holdout < 1:
    raise ValueError(f'holdout fraction must be in [0, 1), got {holdout}')


def _resolve(law: laws_lib.Law | str) -> laws_lib.Law:
  return laws_lib.get_law(law) if isinstance(law, str) else law


@_one_blas_thread()
def estimate(law: laws_lib.Law | str, inputs: Mapping[str, Any], y: Any, *, loss: str = 'huber',
             delta: float = 1e-3, reduction: str = 'sum', weights: Any = None,
             n_starts: int | None = 128, grid: Any = None, seed: int = 0) -> PointFit:
  """The multi-start point estimate alone (no bootstrap).

  Args:
    law: a `laws.Law` or the name of a built-in one.
    inputs: the law's inputs, name -> array of one value per data point.
    y: the target (loss), positive.
    loss: 'huber', 'l2' (least squares) or 'l1' (least absolute deviation), on log residuals.
    delta: Huber's delta, in log-loss units.
    reduction: 'sum' or 'mean' of the penalties (the estimate does not depend on it).
    weights: optional non-negative weight per point (e.g. bootstrap multiplicities).
    n_starts: local fits to run: the best half by objective value at the grid point
      plus a random sample of the rest; None runs one from every grid point.
    grid: `[n_points, n_params]` starts replacing `law.grid_points()`.
    seed: seeds the random choice of starts.

  Returns:
    A `PointFit`.
  """
  law = _resolve(law)
  _check_settings(loss, delta, reduction, 0.5, 0, 0.0)
  x, y, _ = _check_inputs(law, inputs, y, None)
  w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
  if w.shape != y.shape or np.any(w < 0) or not np.any(w > 0):
    raise ValueError(f'weights must be {y.size} non-negative values, not all zero')
  problem = _Problem(law, x, np.log(y), loss, delta, reduction)
  return _multistart(problem, w, _grid(law, grid), n_starts, np.random.default_rng(seed))


def _grid(law: laws_lib.Law, grid: Any) -> Array:
  if grid is None:
    return law.grid_points()
  grid = np.atleast_2d(np.asarray(grid, dtype=np.float64))
  if grid.shape[1] != law.n_params:
    raise ValueError(f'grid must be [n_starts, {law.n_params}] for params {list(law.params)}, '
                     f'got shape {grid.shape}')
  return grid


# ---- bootstrap ---------------------------------------------------------------

def _bootstrap(problem: _Problem, point: PointFit, n_boot: int, groups: Array | None,
               rng: np.random.Generator, extra_starts: int = 2) -> tuple[Array, int]:
  """Parameter vectors refitted on resampled runs.

  Returns:
    (samples `[n_boot, n_params]` with NaN rows for failed refits, the number of
    refits whose polish did not converge).

  Each replicate draws the clusters (runs, or `groups`) with replacement and
  weights every point by its cluster's multiplicity. It is polished from the
  full-data estimate, then fitted from `extra_starts` more starts: the runner-up
  local minimum of the full fit, then the grid points best for that replicate.
  An end point that beats the warm start is polished and replaces it.
  """
  n = problem.log_y.size
  if groups is None:
    unit_of_row, n_units = np.arange(n), n
  else:
    _, unit_of_row = np.unique(groups, return_inverse=True)
    n_units = int(unit_of_row.max()) + 1
  samples = np.full((n_boot, problem.law.n_params), np.nan)
  not_converged = 0
  basis = problem.whitening(point.theta) if n_boot else None
  for b in range(n_boot):
    counts = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units)
    w = counts[unit_of_row].astype(np.float64)
    theta, value, converged = problem.local_fit(point.theta, w, polish=True, basis=basis)
    others = point.minima[1:2]
    if extra_starts > len(others):
      grid_values = problem.values(point.screened, w)
      others = np.concatenate([others, point.screened[np.argsort(grid_values)]])
    for start in others[:extra_starts]:
      t, v, _ = problem.local_fit(start, w, polish=False)
      if v < value * (1 - 1e-9):
        t, v, c = problem.local_fit(t, w, polish=True, basis=basis)
        if v < value:
          theta, value, converged = t, v, c
    if np.isfinite(value):
      samples[b] = theta
      not_converged += not converged
  return samples, not_converged


def _interval(samples: Array, level: float) -> tuple[Array, Array]:
  """Percentile interval along axis 0, ignoring NaN replicates."""
  q = 100 * (1 - level) / 2
  with np.errstate(all='ignore'):
    if samples.shape[0] == 0 or np.all(np.isnan(samples)):
      nan = np.full(samples.shape[1:], np.nan)
      return nan, nan
    return np.nanpercentile(samples, q, axis=0), np.nanpercentile(samples, 100 - q, axis=0)


def _quantity(point: Any, samples: Array, level: float) -> dict[str, Any]:
  """{'estimate', 'lo', 'hi'} (arrays broadcast like `point`)."""
  lo, hi = _interval(np.asarray(samples, dtype=np.float64), level)
  return {'estimate': np.asarray(point, dtype=np.float64), 'lo': lo, 'hi': hi}


# ---- compute-optimal plan ----------------------------------------------------

def _plan(law: laws_lib.Law, theta: Array, samples: Array, level: float,
          compute: laws_lib.ComputeModel | None, budgets: Sequence[float] | None,
          targets: Sequence[float], fixed: Mapping[str, float], max_n: float,
          max_compute: float | None) -> dict[str, Any]:
  """Plan tables with bootstrap intervals; every row has estimate/lo/hi per quantity."""
  ok = samples[np.all(np.isfinite(samples), axis=1)]
  thetas = np.concatenate([theta[None], ok])
  targets = np.asarray(targets, dtype=np.float64)
  plan: dict[str, Any] = {'fixed': dict(fixed), 'targets': [], 'budgets': []}
  plannable = {'n_latents', 'tokens'} <= set(law.inputs)
  if not plannable or compute is None:
    if 'tokens' in law.inputs:
      plan['note'] = 'no compute model given, so no compute-optimal plan'
      return plan
    if 'n_latents' not in law.inputs:
      plan['note'] = f'law {law.name!r} has no n_latents input to extrapolate in'
      return plan
    x = {**{key: np.full_like(targets, v) for key, v in fixed.items()}, 'n_latents': targets}
    loss = laws_lib.predict(law, thetas, x)
    for i, n in enumerate(targets):
      plan['targets'].append({'n_latents': float(n), 'extrapolation': float(n / max_n),
                              'loss': _quantity(loss[0, i], loss[1:, i], level)})
    return plan
  plan['compute'] = compute.describe()
  if budgets is None:
    budgets = [max_compute * 10.0 ** i for i in range(4)] if max_compute else []
  budgets = np.asarray(budgets, dtype=np.float64)
  # One call for every budget the tables need (each budget, and e^(+-step) times it
  # for the local exponents), so the jitted solver compiles once.
  step = 0.1
  centres = np.concatenate([budgets, [max_compute] if max_compute else []])
  everything = np.concatenate([centres, centres * np.exp(step), centres * np.exp(-step)])
  opt = laws_lib.compute_optimal(law, thetas, everything, compute, fixed)
  m = centres.size
  a = (np.log(opt['n_latents'][:, m:2 * m]) - np.log(opt['n_latents'][:, 2 * m:])) / (2 * step)
  b = (np.log(opt['tokens'][:, m:2 * m]) - np.log(opt['tokens'][:, 2 * m:])) / (2 * step)
  for i, c in enumerate(budgets):
    row = {'flops': float(c)}
    for key, arr in (('n_latents', opt['n_latents']), ('tokens', opt['tokens']),
                     ('loss', opt['loss']), ('a', a), ('b', b)):
      row[key] = _quantity(arr[0, i], arr[1:, i], level)
    row['no_optimum_fraction'] = float(np.mean(np.isnan(opt['n_latents'][1:, i])))
    plan['budgets'].append(row)
  if max_compute:
    plan['exponents'] = {'at_flops': float(max_compute),
                         'a': _quantity(a[0, -1], a[1:, -1], level),
                         'b': _quantity(b[0, -1], b[1:, -1], level)}
  if targets.size:
    tok = laws_lib.optimal_tokens_for_size(law, thetas, targets, compute, fixed)
    for i, n in enumerate(targets):
      row = {'n_latents': float(n), 'extrapolation': float(n / max_n)}
      for key in ('tokens', 'flops', 'loss'):
        row[key] = _quantity(tok[key][0, i], tok[key][1:, i], level)
      plan['targets'].append(row)
  return plan


# ---- hold-out validation -----------------------------------------------------

def _validate(law: laws_lib.Law, x: dict[str, Array], y: Array, groups: Array | None,
              order_key: Array, holdout: float, level: float, settings: dict[str, Any],
              rng: np.random.Generator) -> dict[str, Any]:
  """Fit on the cheapest (1 - holdout) of the points, score the predictions on the rest."""
  order = np.argsort(order_key, kind='stable')
  n_train = int(math.ceil((1 - holdout) * y.size))
  train, test = order[:n_train], order[n_train:]
  if test.size == 0:
    raise ValueError(f'holdout={holdout} leaves no point to validate on ({y.size} points)')
  sub = lambda a: None if a is None else a[train]
  x_train = {key: v[train] for key, v in x.items()}
  try:
    _check_inputs(law, x_train, y[train], sub(groups))
  except ValueError as e:
    raise ValueError(f'holdout={holdout} leaves {train.size} points to fit: {e}') from None
  problem = _Problem(law, x_train, np.log(y[train]), settings['loss'], settings['delta'],
                     settings['reduction'])
  point = _multistart(problem, np.ones(train.size), settings['grid'], settings['n_starts'], rng)
  samples, _ = _bootstrap(problem, point, settings['n_boot'], sub(groups), rng,
                          settings['bootstrap_starts'])
  ok = samples[np.all(np.isfinite(samples), axis=1)]
  x_test = {key: v[test] for key, v in x.items()}
  pred = laws_lib.predict(law, point.theta, x_test)
  rel = pred / y[test] - 1
  # Prediction interval: parameter uncertainty (bootstrap) plus the scatter of
  # the training residuals, both in log space.
  residuals = problem.log_y - np.log(laws_lib.predict(law, point.theta, x_train))
  thetas = ok if len(ok) else point.theta[None]
  log_pred = np.log(laws_lib.predict(law, thetas, x_test)).reshape(len(thetas), -1)
  # At least 1000 draws, so that the residual part is resolved even without a bootstrap.
  log_pred = np.tile(log_pred, (-(-1000 // len(thetas)), 1))
  draws = log_pred + rng.choice(residuals, size=log_pred.shape)
  lo, hi = _interval(draws, level)
  inside = (np.log(y[test]) >= lo) & (np.log(y[test]) <= hi)
  return {
      'n_train': int(train.size), 'n_test': int(test.size),
      'train_max_key': float(order_key[train].max()), 'test_max_key': float(order_key[test].max()),
      'rel_error_mean': float(np.mean(rel)), 'rel_error_rms': float(np.sqrt(np.mean(rel ** 2))),
      'rel_error_max': float(np.max(np.abs(rel))), 'coverage': float(np.mean(inside)),
      'level': level, 'train_estimate': dict(zip(law.display_names, law.natural(point.theta))),
      'test_rows': test.tolist(), 'test_predicted': pred.tolist(),
      'test_lo': np.exp(lo).tolist(), 'test_hi': np.exp(hi).tolist()}


# ---- diagnostics ---------------------------------------------------------------

def _diagnostics(law: laws_lib.Law, samples: Array, not_converged: int, intervals: dict,
                 point: PointFit, n_units: int, level: float, validation: dict | None,
                 plan: dict | None) -> list[str]:
  warnings = []
  if not point.converged:
    warnings.append('the polished fit did not converge; the estimate may not be a minimum '
                    '(try more starts or another loss)')
  if not_converged > 0.05 * max(len(samples), 1):
    warnings.append(f'{not_converged} of {len(samples)} bootstrap refits did not converge')
  failed = np.mean(~np.all(np.isfinite(samples), axis=1)) if len(samples) else 0.0
  if failed > 0.05:
    warnings.append(f'{failed:.0%} of bootstrap refits failed; intervals use the rest')
  if 0 < len(samples) and n_units < 10:
    warnings.append(f'the bootstrap resamples only {n_units} clusters; intervals are coarse')
  for raw, name in zip(law.params, law.display_names):
    lo, hi = intervals[name]
    if not (np.isfinite(lo) and np.isfinite(hi)):
      continue
    if raw in law.log_params and hi > 4 * lo:
      warnings.append(f'{name} is poorly identified: its {level:.0%} interval [{lo:.4g}, {hi:.4g}] '
                      f'spans a factor {hi / lo:.3g}')
    elif raw not in law.log_params and hi - lo > 1.0:
      warnings.append(f'{name} is poorly identified: its {level:.0%} interval '
                      f'[{lo:.4g}, {hi:.4g}] is wider than 1')
  ok = samples[np.all(np.isfinite(samples), axis=1)]
  if len(ok) > law.n_params + 2:
    with np.errstate(all='ignore'):
      corr = np.corrcoef(ok, rowvar=False)
    names = law.display_names
    pairs = [f'{names[i]}-{names[j]} ({corr[i, j]:+.3f})' for i in range(law.n_params)
             for j in range(i + 1, law.n_params) if abs(corr[i, j]) > CORRELATION_WARNING]
    if pairs:
      warnings.append(
          f'strongly correlated across the bootstrap (|corr| > {CORRELATION_WARNING}): '
          f"{', '.join(pairs)}; the data fix combinations of these, not each one, so trust "
          'predictions and their bootstrap bands rather than the separate values')
  if validation is not None and validation['coverage'] < level - 0.15:
    warnings.append(f"hold-out coverage {validation['coverage']:.0%} is far below the nominal "
                    f'{level:.0%}: the law or its intervals do not extrapolate to the larger runs')
  for row in (plan or {}).get('budgets', []):
    if row['no_optimum_fraction'] > 0.05:
      warnings.append(f"at {row['flops']:.3g} FLOPs {row['no_optimum_fraction']:.0%} of bootstrap "
                      'replicates have no interior compute optimum')
  far = [r['n_latents'] for r in (plan or {}).get('targets', []) if r['extrapolation'] > 100]
  if far:
    warnings.append(f'targets {[f"{n:.3g}" for n in far]} are over 100x beyond the largest run; '
                    'read their intervals as a lower bound on the uncertainty')
  return warnings


# ---- result --------------------------------------------------------------------

@dataclasses.dataclass
class FitResult:
  """A fitted law with its uncertainty, validation, diagnostics and plan.

  Attributes:
    law: the law fitted.
    theta: raw parameter estimate (log coefficients, exponents), `[n_params]`.
    estimate: reported name -> value (coefficients exponentiated: A, B, E).
    intervals: reported name -> (lo, hi) bootstrap percentile interval.
    std: reported name -> bootstrap standard deviation.
    correlation: bootstrap correlation of the raw parameters, `[n_params, n_params]`.
    samples: raw parameters of every bootstrap replicate (NaN rows: failed refits).
    objective: the minimised objective.
    converged: whether the polish converged (see `PointFit`).
    n_points: data points fitted; n_units: bootstrap clusters.
    settings: the fitting options used.
    plan: compute-optimal plan and extrapolation tables (see `fit_law`), or None.
    validation: hold-out validation summary, or None.
    warnings: diagnostics, in words.
    inputs: the law's inputs as fitted (name -> array); y: the target.
    compute: the compute model of the plan, or None; fixed: the plan's other inputs.
  """
  law: laws_lib.Law
  theta: Array
  estimate: dict[str, float]
  intervals: dict[str, tuple[float, float]]
  std: dict[str, float]
  correlation: Array
  samples: Array
  objective: float
  converged: bool
  n_points: int
  n_units: int
  settings: dict[str, Any]
  plan: dict[str, Any] | None
  validation: dict[str, Any] | None
  warnings: list[str]
  inputs: dict[str, Array]
  y: Array
  compute: laws_lib.ComputeModel | None = None
  fixed: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def ok_samples(self) -> Array:
    return self.samples[np.all(np.isfinite(self.samples), axis=1)]

  def predict(self, inputs: Mapping[str, Any]) -> Array:
    """Predicted loss at `inputs` (name -> array) with the point estimate."""
    return laws_lib.predict(self.law, self.theta, inputs)

  def predict_samples(self, inputs: Mapping[str, Any]) -> Array:
    """Predicted loss for every successful bootstrap replicate, `[n_ok, n_points]`."""
    ok = self.ok_samples
    if not len(ok):
      return np.zeros((0, np.size(next(iter(inputs.values())))))
    return laws_lib.predict(self.law, ok, inputs)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready summary (NaN written as null)."""
    return _jsonable({
        'law': self.law.name, 'formula': self.law.formula, 'params': list(self.law.params),
        'estimate': self.estimate, 'intervals': self.intervals, 'std': self.std,
        'raw_estimate': dict(zip(self.law.params, self.theta)),
        'correlation': self.correlation, 'bootstrap_samples': self.samples,
        'objective': self.objective, 'converged': self.converged, 'n_points': self.n_points,
        'n_units': self.n_units,
        'settings': {k: v for k, v in self.settings.items() if k != 'grid'},
        'validation': self.validation, 'plan': self.plan, 'warnings': self.warnings,
        'compute': None if self.compute is None else dataclasses.asdict(self.compute),
        'fixed': self.fixed})

  def report(self) -> str:
    """A readable multi-line report."""
    return _report(self)


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    return float(obj) if np.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def _mode(values: Array) -> float:
  uniq, counts = np.unique(values, return_counts=True)
  return float(uniq[np.argmax(counts)])


@_one_blas_thread()
def fit_law(law: laws_lib.Law | str, inputs: Mapping[str, Any], y: Any, *,
            loss: str = 'huber', delta: float = 1e-3, reduction: str = 'sum',
            n_boot: int = 200, groups: Any = None, level: float = 0.95, seed: int = 0,
            n_starts: int | None = 128, grid: Any = None, bootstrap_starts: int = 2,
            holdout: float = 0.0,
            row_compute: Any = None, compute: laws_lib.ComputeModel | None = None,
            budgets: Sequence[float] | None = None,
            targets: Sequence[float] = DEFAULT_TARGETS,
            fixed: Mapping[str, float] | None = None) -> FitResult:
  """Fits a scaling law with bootstrap intervals, validation, diagnostics and a plan.

  Args:
    law: a `laws.Law` or the name of a built-in one ('power', 'chinchilla', 'openai').
    inputs: name -> array, one value per data point (e.g. 'n_latents', 'tokens', 'k').
    y: the target per point (loss, FVU, MSE), positive.
    loss: 'huber', 'l2' or 'l1' penalty on log residuals.
    delta: Huber's delta (log-loss units).
    reduction: 'sum' or 'mean' of the penalties; the estimate is the same either way.
    n_boot: bootstrap replicates (0: none, no intervals).
    groups: optional cluster id per point (run, seed); the bootstrap resamples
      whole clusters. Without it each point is its own run.
    level: interval level, e.g. 0.95.
    seed: seeds starts, bootstrap and prediction-interval draws.
    n_starts: local fits for the point estimate (see `estimate`); None: all grid points.
    grid: replaces the law's grid of starts, `[n_points, n_params]`.
    bootstrap_starts: starts per bootstrap replicate besides the full-data
      estimate (the runner-up local minimum, then the replicate's best grid points).
    holdout: fraction of the most expensive points kept out of a validation fit
      (0: no validation). Points are ordered by `row_compute`, else by the compute
      model's FLOPs, else by n_latents.
    row_compute: optional FLOPs of each point (orders the hold-out, sets default budgets).
    compute: how FLOPs depend on (n, D); enables the compute-optimal plan for
      laws with 'n_latents' and 'tokens' inputs.
    budgets: FLOP budgets for the plan; default the largest run's compute x 1, 10, 100, 1000.
    targets: dictionary sizes to extrapolate to (default 1M, 4M, 16M, 34M).
    fixed: values for the law's other inputs in the plan (e.g. {'k': 32}); by
      default the most common value in the data.

  Returns:
    A `FitResult`. `plan['budgets']` rows hold the compute-optimal n_latents,
    tokens, loss and local exponents a, b (n_opt ~ C^a, D_opt ~ C^b) per budget;
    `plan['targets']` rows the tokens, FLOPs and loss at which each target size
    is compute-optimal (or, for laws without tokens, the predicted loss); every
    quantity as {'estimate', 'lo', 'hi'}.

  Raises:
    ValueError: unknown law, loss or reduction; missing inputs (listed with those
      present); non-positive or non-finite values; too few runs for the parameters.
  """
  law = _resolve(law)
  _check_settings(loss, delta, reduction, level, n_boot, holdout)
  x, y, groups = _check_inputs(law, inputs, y, groups)
  rng = np.random.default_rng(seed)
  settings = {'loss': loss, 'delta': delta, 'reduction': reduction, 'n_boot': n_boot,
              'level': level, 'seed': seed, 'n_starts': n_starts, 'grid': _grid(law, grid),
              'bootstrap_starts': bootstrap_starts,
              'holdout': holdout, 'clustered': groups is not None}

  problem = _Problem(law, x, np.log(y), loss, delta, reduction)
  point = _multistart(problem, np.ones_like(y), settings['grid'], n_starts, rng)
  logging.info('%s: objective %.6g from %d starts (converged: %s)', law.name, point.objective,
               point.n_starts, point.converged)
  samples, not_converged = _bootstrap(problem, point, n_boot, groups, rng, bootstrap_starts)
  n_units = y.size if groups is None else len(np.unique(groups))

  names = law.display_names
  nat = law.natural(samples)
  lo, hi = _interval(nat, level)
  ok = nat[np.all(np.isfinite(nat), axis=1)]
  with np.errstate(all='ignore'):
    std = ok.std(axis=0, ddof=1) if len(ok) > 1 else np.full(law.n_params, np.nan)
    raw_ok = samples[np.all(np.isfinite(samples), axis=1)]
    corr = (np.corrcoef(raw_ok, rowvar=False) if len(raw_ok) > 2
            else np.full((law.n_params, law.n_params), np.nan))

  plannable = {'n_latents', 'tokens'} <= set(law.inputs)
  flops = None
  if row_compute is not None:
    flops = np.asarray(row_compute, dtype=np.float64).reshape(-1)
    if flops.shape != y.shape or not np.all(np.isfinite(flops) & (flops > 0)):
      raise ValueError(f'row_compute must be {y.size} finite positive FLOP counts')
  elif compute is not None and plannable:
    flops = compute.flops(x['n_latents'], x['tokens'])
  fixed = dict(fixed or {})
  for name in law.inputs:
    if name not in ('n_latents', 'tokens') and name not in fixed:
      fixed[name] = _mode(x[name])

  validation = None
  if holdout > 0:
    key = flops if flops is not None else x['n_latents']
    validation = _validate(law, x, y, groups, key, holdout, level, settings, rng)
    validation['ordered_by'] = 'flops' if flops is not None else 'n_latents'
  plan = None
  if 'n_latents' in law.inputs:
    plan = _plan(law, point.theta, samples, level, compute, budgets, targets, fixed,
                 float(x['n_latents'].max()), None if flops is None else float(flops.max()))
  intervals = {n: (float(a), float(b)) for n, a, b in zip(names, lo, hi)}
  warnings = _diagnostics(law, samples, not_converged, intervals, point, n_units, level,
                          validation, plan)
  for w in warnings:
    logging.warning('%s fit: %s', law.name, w)
  return FitResult(
      law=law, theta=point.theta,
      estimate={n: float(v) for n, v in zip(names, law.natural(point.theta))},
      intervals=intervals, std={n: float(s) for n, s in zip(names, std)}, correlation=corr,
      samples=samples, objective=point.objective, converged=point.converged, n_points=y.size,
      n_units=n_units, settings=settings, plan=plan, validation=validation, warnings=warnings,
      inputs=x, y=y, compute=compute, fixed=fixed)


# ---- report --------------------------------------------------------------------

def _q(q: dict[str, Any], fmt: str = '.4g') -> str:
  est, lo, hi = (float(q[k]) for k in ('estimate', 'lo', 'hi'))
  if not np.isfinite(lo):
    return f'{est:{fmt}}'
  return f'{est:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]'


def _report(r: FitResult) -> str:
  s = r.settings
  pct = f"{s['level']:.0%}"
  loss = f"huber (delta={s['delta']:g})" if s['loss'] == 'huber' else s['loss']
  lines = [f'Scaling law {r.law.name!r}: {r.law.formula}',
           f"Fit: {loss} on log residuals, "
           f"{'summed' if s['reduction'] == 'sum' else 'averaged'} over "
           f"{r.n_points} points; objective {r.objective:.6g}; "
           f"{'converged' if r.converged else 'NOT converged'}"]
  n_ok = len(r.ok_samples)
  if s['n_boot']:
    unit = 'clusters' if s['clustered'] else 'runs'
    lines.append(f"Bootstrap: {n_ok}/{s['n_boot']} replicates resampling {r.n_units} {unit}; "
                 f'{pct} percentile intervals')
  lines += ['', f"{'parameter':<10} {'estimate':>12}   {pct + ' interval':<27} {'boot std':>10}"]
  for name in r.law.display_names:
    lo, hi = r.intervals[name]
    interval = f'[{lo:.4g}, {hi:.4g}]' if np.isfinite(lo) else '-'
    lines.append(f'{name:<10} {r.estimate[name]:>12.5g}   {interval:<27} {r.std[name]:>10.4g}')
  v = r.validation
  if v is not None:
    lines += ['', f"Hold-out validation: fitted on the {v['n_train']} cheapest points (by "
              f"{v.get('ordered_by', 'compute')} <= {v['train_max_key']:.3g}), scored on the other "
              f"{v['n_test']} (up to {v['test_max_key']:.3g})",
              f"  relative error of the predicted loss: mean {v['rel_error_mean']:+.2%}, "
              f"RMS {v['rel_error_rms']:.2%}, max {v['rel_error_max']:.2%}",
              f"  {pct} prediction intervals cover {v['coverage']:.1%} of the held-out points"]
  p = r.plan
  if p is not None:
    lines.append('')
    if 'note' in p:
      lines.append(f"Plan: {p['note']}")
    if 'exponents' in p:
      e = p['exponents']
      lines.append(f"Compute-optimal frontier ({p['compute']}), at {e['at_flops']:.3g} FLOPs: "
                   f"n_opt ~ C^{_q(e['a'], '.3f')}, D_opt ~ C^{_q(e['b'], '.3f')}")
    if p['budgets']:
      lines.append(f"{'budget FLOPs':>12}  {'n_latents':<30} {'tokens':<30} {'loss':<26}")
      for row in p['budgets']:
        lines.append(f"{row['flops']:>12.3g}  {_q(row['n_latents'], '.3g'):<30} "
                     f"{_q(row['tokens'], '.3g'):<30} {_q(row['loss']):<26}")
    if p['targets']:
      fixed = ', '.join(f'{k}={v:g}' for k, v in p['fixed'].items())
      lines.append(f"Extrapolation{' (' + fixed + ')' if fixed else ''}:")
      if 'tokens' in p['targets'][0]:
        lines.append(f"{'n_latents':>10} {'x data':>7}  {'tokens (compute-optimal)':<30} "
                     f"{'FLOPs':<30} {'loss':<26}")
        for row in p['targets']:
          lines.append(f"{row['n_latents']:>10.3g} {row['extrapolation']:>7.3g}  "
                       f"{_q(row['tokens'], '.3g'):<30} {_q(row['flops'], '.3g'):<30} "
                       f"{_q(row['loss']):<26}")
      else:
        lines.append(f"{'n_latents':>10} {'x data':>7}  {'loss':<26}")
        for row in p['targets']:
          lines.append(f"{row['n_latents']:>10.3g} {row['extrapolation']:>7.3g}  "
                       f"{_q(row['loss']):<26}")
  lines += ['', 'Diagnostics:' if r.warnings else 'Diagnostics: none']
  lines += [f'  - {w}' for w in r.warnings]
  return '\n'.join(lines)
