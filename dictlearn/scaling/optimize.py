"""The estimator of a scaling law: robust objective, multi-start L-BFGS-B, bootstrap refits.

Hoffmann et al.'s (2022) Approach 3 as re-done by Besiroglu et al. (2024),
"Chinchilla Scaling: A replication attempt":

  * positive coefficients are fitted through their logs and predictions are made
    in log space (`laws.Law`);
  * the objective is a robust penalty of the log residuals (Huber, least squares
    or least absolute deviation), summed (or averaged) over the data points;
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

Huber's delta. Besiroglu et al. used delta = 1e-3 on Chinchilla's log losses.
On SAE sweeps, whose log residuals scatter by about 1e-2, a delta ten times
below the noise makes Huber least absolute deviation in all but name, which
estimates (and extrapolates) worse than least squares on Gaussian-like noise.
`huber_delta` therefore takes delta from the data: 1.345 times a robust scale
of the residuals of a first least-squares fit (the median absolute deviation,
as a normal standard deviation, corrected for the parameters fitted); 1.345 is
the textbook choice, 95% as efficient as least squares on normal noise while
still bounding the pull of an outlier.
"""
import contextlib
import ctypes
import dataclasses
import functools
import logging
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dictlearn.scaling import laws as laws_lib

LOSSES = ('huber', 'l2', 'l1')
REDUCTIONS = ('sum', 'mean')
# Huber's tuning constant in units of the noise scale: 95% efficiency at the normal.
HUBER_TUNING = 1.345
# The normal standard deviation per unit of median absolute deviation.
_MAD_TO_SIGMA = 1.482602218505602
# Least absolute deviation is optimised as Huber with this tiny delta (divided by
# it): the same minimiser to within ~1e-6 in log loss, but differentiable. It is
# also the floor of a data-driven delta (noise-free data).
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
def one_blas_thread():
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

def _penalty(loss: str):
  """rho(r, delta) of one log residual; delta is traced, so a new delta compiles nothing."""
  if loss == 'l2':
    return lambda r, delta: 0.5 * r * r

  def huber(r, delta):
    a = jnp.abs(r)
    rho = jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    return rho / delta if loss == 'l1' else rho
  return huber


@functools.lru_cache(maxsize=32)
def _objective_fns(law: laws_lib.Law, loss: str, reduction: str):
  """Jitted objective(theta, inputs, log_y, weights, delta): value_and_grad for one theta,
  and values for a batch of thetas."""
  rho = _penalty(loss)

  def objective(theta, inputs, log_y, weights, delta):
    total = jnp.sum(weights * rho(law.log_loss(theta, inputs) - log_y, delta))
    return total / jnp.sum(weights) if reduction == 'mean' else total

  value_and_grad = jax.jit(jax.value_and_grad(objective))
  batch = jax.jit(jax.vmap(objective, (0, None, None, None, None)))
  return value_and_grad, batch


@functools.lru_cache(maxsize=32)
def _jacobian_fn(law: laws_lib.Law):
  """Jitted d log L / d theta at every point, `[n_points, n_params]`."""
  return jax.jit(jax.jacfwd(law.log_loss))


@dataclasses.dataclass
class Problem:
  """One data set to fit: the law, the penalty and the (weighted) points."""
  law: laws_lib.Law
  inputs: dict[str, Array]
  log_y: Array
  loss: str
  delta: float
  reduction: str

  def fns(self):
    """(value_and_grad, batch) of the objective, each f(theta(s), inputs, log_y, weights)."""
    value_and_grad, batch = _objective_fns(self.law, self.loss, self.reduction)
    delta = _L1_SMOOTHING if self.loss == 'l1' else self.delta
    return (lambda *args: value_and_grad(*args, delta)), (lambda *args: batch(*args, delta))

  def residuals(self, theta: Array) -> Array:
    """Log residuals, data minus law, at `theta`."""
    with jax.enable_x64(True):
      return self.log_y - np.asarray(self.law.log_loss(jnp.asarray(theta), self.inputs))

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


def multistart(problem: Problem, weights: Array, grid: Array, n_starts: int | None,
               rng: np.random.Generator, n_polish: int = 3) -> PointFit:
  """Screening fits from `n_starts` grid points (None: all), then a polish of the best `n_polish`.

  Raises:
    ValueError: the objective is not finite at any grid point.
  """
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

def check_inputs(law: laws_lib.Law, inputs: Mapping[str, Any], y: Any, groups: Any,
                 target: str = 'loss') -> tuple[dict[str, Array], Array, Array | None]:
  """The law's inputs, the target and the groups as float arrays, checked.

  Raises:
    ValueError: a missing input (listed with those present), a non-finite or
      non-positive value (named with its rows), mismatched lengths, or fewer
      runs (groups) than the law has parameters + 1.
  """
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
    raise ValueError(f'the target ({target}) must be finite and positive, since it is fitted '
                     f'in log space; {bad.sum()} values are not, e.g. {y[bad][:3].tolist()} at '
                     f'rows {np.flatnonzero(bad)[:3].tolist()}')
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


def start_grid(law: laws_lib.Law, grid: Any) -> Array:
  """`grid` as `[n_starts, n_params]` floats, or the law's own grid when None."""
  if grid is None:
    return law.grid_points()
  grid = np.atleast_2d(np.asarray(grid, dtype=np.float64))
  if grid.shape[1] != law.n_params:
    raise ValueError(f'grid must be [n_starts, {law.n_params}] for params {list(law.params)}, '
                     f'got shape {grid.shape}')
  return grid


# ---- Huber's delta from the data ----------------------------------------------

def residual_scale(residuals: Any, n_params: int) -> float:
  """A robust standard deviation of fitted log residuals.

  1.4826 x the median absolute deviation from the median (a normal standard
  deviation, unmoved by a few wild points), times sqrt(n / (n - n_params)):
  residuals of a fit of n_params parameters scatter less than the noise.
  """
  r = np.asarray(residuals, dtype=np.float64).reshape(-1)
  r = r[np.isfinite(r)]
  if r.size <= n_params:
    raise ValueError(f'a residual scale needs more than {n_params} finite residuals, got {r.size}')
  return float(mad_std(r) * math.sqrt(r.size / (r.size - n_params)))


def mad_std(values: Any, axis: int = 0) -> Array:
  """1.4826 x the median absolute deviation along `axis`: a standard deviation that a
  few wild values do not move (that of a normal distribution, for normal values)."""
  v = np.asarray(values, dtype=np.float64)
  return _MAD_TO_SIGMA * np.median(np.abs(v - np.median(v, axis=axis, keepdims=True)), axis=axis)


def huber_delta(problem: Problem, weights: Array, grid: Array, n_starts: int | None,
                rng: np.random.Generator) -> tuple[float, float]:
  """Huber's delta for `problem`'s data: HUBER_TUNING x the residual scale of a least-squares fit.

  Args:
    problem: the data (fitted here by least squares, whatever its own loss).
    weights: weight of each point; the scale is that of the points weighted > 0.
    grid: starts of the first fit.
    n_starts: the starts of the fit that follows; the first fit runs from a
      quarter of them (at least 8; all of the grid when None): it serves only
      to measure the noise.
    rng: chooses the starts.

  Returns:
    (delta, scale); delta is at least 1e-6 (noise-free data).
  """
  l2 = dataclasses.replace(problem, loss='l2', delta=1.0)
  starts = None if n_starts is None else max(8, n_starts // 4)
  first = multistart(l2, weights, grid, starts, rng, n_polish=1)
  scale = residual_scale(l2.residuals(first.theta)[weights > 0], problem.law.n_params)
  return max(HUBER_TUNING * scale, _L1_SMOOTHING), scale


# ---- bootstrap ---------------------------------------------------------------

def bootstrap(problem: Problem, point: PointFit, n_boot: int, groups: Array | None,
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


