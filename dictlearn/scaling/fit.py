"""Fitting a scaling law honestly: bootstrap intervals, hold-out validation, diagnostics, plan.

    result = fit_law('chinchilla', {'n_latents': n, 'tokens': d}, fvu, target='fvu',
                     options=FitOptions(holdout=0.2),
                     plan=PlanOptions(compute=ComputeModel('sae', d_model=768)))
    print(result.report())

The estimator (robust objective, multi-start L-BFGS-B, Huber's delta from the
data) is `dictlearn.scaling.optimize`. Uncertainty comes from a bootstrap over
runs (clusters when `groups` is given), each replicate polished from the
full-data estimate and refitted from the runner-up local minimum and the best
grid points for that replicate (Huber's delta stays the full data's). Every
derived quantity (exponents, compute-optimal sizes, predicted losses) is
computed for each replicate and reported as a percentile interval. Parameters
also get two spreads: the bootstrap standard deviation and a robust one
(1.4826 x the median absolute deviation); where the data barely pin a
coefficient, a few wild replicates (A = 1e120) make the first meaningless.
"""
import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from dictlearn.scaling import laws as laws_lib
from dictlearn.scaling import optimize
from dictlearn.scaling import report as report_lib
from dictlearn.scaling.optimize import LOSSES, REDUCTIONS, PointFit

DEFAULT_TARGETS = (1e6, 4e6, 16e6, 34e6)
# |correlation| of two parameters across the bootstrap above which they are flagged.
CORRELATION_WARNING = 0.95
# A bootstrap standard deviation this many times the robust spread is flagged.
WILD_SPREAD_WARNING = 3.0

Array = np.ndarray
log = logging.getLogger(__name__)

__all__ = ['CORRELATION_WARNING', 'DEFAULT_TARGETS', 'FitOptions', 'FitResult', 'LOSSES',
           'PlanOptions', 'PointFit', 'REDUCTIONS', 'WILD_SPREAD_WARNING', 'bootstrap_spreads',
           'estimate', 'fit_law', 'holdout_largest', 'validate']


# ---- options -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class FitOptions:
  """How a law is fitted and how its uncertainty is measured.

  Attributes:
    loss: 'huber', 'l2' (least squares) or 'l1' (least absolute deviation), on
      log residuals.
    delta: Huber's delta in log-loss units; None (default): from the data,
      1.345 x the robust scale of a least-squares fit's residuals
      (`optimize.huber_delta`). Besiroglu et al. used 1e-3 on Chinchilla.
    reduction: 'sum' or 'mean' of the penalties; the estimate is the same either way.
    n_starts: local fits for the point estimate: the best half of the grid by
      objective plus a random rest; None: every grid point.
    grid: `[n_points, n_params]` starts replacing the law's grid.
    n_boot: bootstrap replicates (0: none, no intervals).
    bootstrap_starts: starts per bootstrap replicate besides the full-data
      estimate (the runner-up local minimum, then the replicate's best grid points).
    level: interval level, e.g. 0.95.
    holdout: fraction of the most expensive points kept out of a validation fit
      (0: no validation); see `fit_law`.
    seed: seeds starts, bootstrap and prediction-interval draws.

  Raises (on construction):
    ValueError: a value out of range, or an unknown loss or reduction.
  """
  loss: str = 'huber'
  delta: float | None = None
  reduction: str = 'sum'
  n_starts: int | None = 128
  grid: Any = None
  n_boot: int = 200
  bootstrap_starts: int = 2
  level: float = 0.95
  holdout: float = 0.0
  seed: int = 0

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f'unknown loss {self.loss!r}; expected one of {LOSSES}')
    if self.reduction not in REDUCTIONS:
      raise ValueError(f'unknown reduction {self.reduction!r}; expected one of {REDUCTIONS}')
    if self.delta is not None and not self.delta > 0:
      raise ValueError(f'Huber delta must be > 0 (or None: from the data), got {self.delta}')
    if self.n_starts is not None and self.n_starts < 1:
      raise ValueError(f'n_starts must be >= 1 (or None: every grid point), got {self.n_starts}')
    if not 0 < self.level < 1:
      raise ValueError(f'interval level must be in (0, 1), got {self.level}')
    if self.n_boot < 0:
      raise ValueError(f'n_boot must be >= 0, got {self.n_boot}')
    if self.bootstrap_starts < 0:
      raise ValueError(f'bootstrap_starts must be >= 0, got {self.bootstrap_starts}')
    if not 0 <= self.holdout < 1:
      raise ValueError(f'holdout fraction must be in [0, 1), got {self.holdout}')

  def to_dict(self) -> dict[str, Any]:
    """The options as JSON-ready values; the grid as 'law' or its number of starts."""
    out = dataclasses.asdict(self)
    out['grid'] = 'law' if self.grid is None else f'{len(np.atleast_2d(self.grid))} given starts'
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class PlanOptions:
  """What the plan computes: a compute-optimal frontier and an extrapolation in size.

  Attributes:
    compute: how FLOPs depend on (n, D); enables the compute-optimal plan for
      laws with 'n_latents' and 'tokens' inputs.
    budgets: FLOP budgets; default the largest run's compute x 1, 10, 100, 1000.
    targets: dictionary sizes to extrapolate to (default 1M, 4M, 16M, 34M).
    fixed: values of the law's other inputs (e.g. {'k': 32}); by default the
      most common value in the data.
  """
  compute: laws_lib.ComputeModel | None = None
  budgets: Sequence[float] | None = None
  targets: Sequence[float] = DEFAULT_TARGETS
  fixed: Mapping[str, float] | None = None


# ---- the point estimate ----------------------------------------------------------

@dataclasses.dataclass
class _Estimate:
  problem: optimize.Problem  # with the delta used
  point: PointFit
  residual_scale: float | None  # the robust noise scale delta came from, when it did


def _point_estimate(law: laws_lib.Law, x: dict[str, Array], y: Array, options: FitOptions,
                    rng: np.random.Generator, weights: Array | None = None) -> _Estimate:
  """Huber's delta (from the data when options.delta is None), then the multi-start fit."""
  weights = np.ones_like(y) if weights is None else weights
  grid = optimize.start_grid(law, options.grid)
  problem = optimize.Problem(law, x, np.log(y), options.loss, options.delta or 1.0,
                             options.reduction)
  scale = None
  if options.loss == 'huber' and options.delta is None:
    delta, scale = optimize.huber_delta(problem, weights, grid, options.n_starts, rng)
    problem = dataclasses.replace(problem, delta=delta)
  point = optimize.multistart(problem, weights, grid, options.n_starts, rng)
  log.info('%s: objective %.6g from %d starts (converged: %s)', law.name, point.objective,
           point.n_starts, point.converged)
  return _Estimate(problem, point, scale)


def _resolve(law: laws_lib.Law | str) -> laws_lib.Law:
  return laws_lib.get_law(law) if isinstance(law, str) else law


@optimize.one_blas_thread()
def estimate(law: laws_lib.Law | str, inputs: Mapping[str, Any], y: Any, *,
             options: FitOptions = FitOptions(), weights: Any = None) -> PointFit:
  """The multi-start point estimate alone (no bootstrap, validation or plan).

  Args:
    law: a `laws.Law` or the name of a built-in one.
    inputs: the law's inputs, name -> array of one value per data point.
    y: the target (loss), positive.
    options: loss, delta (None: from the data), reduction, n_starts, grid and seed are used.
    weights: optional non-negative weight per point (e.g. bootstrap multiplicities).

  Returns:
    A `PointFit`.
  """
  law = _resolve(law)
  x, y, _ = optimize.check_inputs(law, inputs, y, None)
  w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
  if w.shape != y.shape or np.any(w < 0) or not np.any(w > 0):
    raise ValueError(f'weights must be {y.size} non-negative values, not all zero')
  return _point_estimate(law, x, y, options, np.random.default_rng(options.seed), w).point


# ---- bootstrap summaries ---------------------------------------------------------

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


def bootstrap_spreads(law: laws_lib.Law, samples: Array, level: float) -> dict[str, Any]:
  """What the bootstrap replicates say about each parameter (reported names).

  Args:
    law: the law.
    samples: raw parameters of the replicates, `[n_boot, n_params]` (NaN rows: failed).
    level: interval level.

  Returns:
    intervals (percentile, name -> (lo, hi)), std (standard deviation),
    robust_std (1.4826 x median absolute deviation), correlation (of the raw
    parameters), and wild: the names whose standard deviation exceeds
    WILD_SPREAD_WARNING x the robust one (a few wild replicates dominate it).
  """
  nat = law.natural(samples)
  lo, hi = _interval(nat, level)
  ok = nat[np.all(np.isfinite(nat), axis=1)]
  raw_ok = samples[np.all(np.isfinite(samples), axis=1)]
  nan = np.full(law.n_params, np.nan)
  with np.errstate(all='ignore'):
    std = ok.std(axis=0, ddof=1) if len(ok) > 1 else nan
    robust = optimize.mad_std(ok) if len(ok) > 1 else nan
    corr = (np.corrcoef(raw_ok, rowvar=False) if len(raw_ok) > 2
            else np.full((law.n_params, law.n_params), np.nan))
  names = law.display_names
  return {'intervals': {n: (float(a), float(b)) for n, a, b in zip(names, lo, hi)},
          'std': {n: float(v) for n, v in zip(names, std)},
          'robust_std': {n: float(v) for n, v in zip(names, robust)}, 'correlation': corr,
          'wild': [n for n, a, b in zip(names, std, robust) if a > WILD_SPREAD_WARNING * b]}


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
    replicates = opt['n_latents'][1:, i]
    row['no_optimum_fraction'] = float(np.mean(np.isnan(replicates))) if replicates.size else 0.0
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

def holdout_largest(n_latents: Any, k: int) -> Array:
  """Mask of the points whose n_latents is among the `k` largest distinct sizes.

  Raises:
    ValueError: k < 1, or k leaves no smaller size to fit on.
  """
  n = np.asarray(n_latents, dtype=np.float64).reshape(-1)
  sizes = np.unique(n)
  if not 1 <= k < sizes.size:
    raise ValueError(f'holding out the {k} largest sizes needs 1 <= k < the number of distinct '
                     f'sizes ({sizes.size}: {sizes.tolist()[:8]})')
  return n >= sizes[-k]


@optimize.one_blas_thread()
def validate(law: laws_lib.Law | str, inputs: Mapping[str, Any], y: Any, test: Any, *,
             target: str = 'loss', groups: Any = None,
             options: FitOptions = FitOptions()) -> tuple[dict[str, Any], 'FitResult']:
  """Fits the points outside `test` and scores its predictions of the points in `test`.

  Args:
    law: a `laws.Law` or the name of a built-in one.
    inputs: name -> array, one value per point.
    y: the target per point.
    test: the held-out points: a boolean mask or row indices.
    target: the target's name, for messages.
    groups: optional bootstrap cluster per point.
    options: how to fit (options.holdout is ignored).

  Returns:
    (summary, the fit on the other points). summary: n_train, n_test; the
    relative error of the predictions (mean, RMS, max); the coverage of the
    prediction intervals at options.level (bootstrap parameter uncertainty plus
    the scatter of the training residuals, in log space); train_estimate;
    per held-out point test_rows, test_predicted, test_lo, test_hi.

  Raises:
    ValueError: `test` holds no point, or leaves too few to fit.
  """
  law = _resolve(law)
  x, y, groups = optimize.check_inputs(law, inputs, y, groups, target)
  test = np.asarray(test).reshape(-1)
  held = np.zeros(y.size, dtype=bool)
  if test.dtype == bool and test.shape == y.shape:
    held = test
  elif test.dtype != bool and test.size and np.all((0 <= test) & (test < y.size)):
    held[test.astype(int)] = True
  if not held.any():
    raise ValueError(f'the held-out points must be a non-empty mask or list of row indices over '
                     f'the {y.size} points, got {test[:8].tolist()}')
  train = ~held
  sub = lambda a: None if a is None else a[train]
  x_train = {key: v[train] for key, v in x.items()}
  try:
    fit = fit_law(law, x_train, y[train], target=target, groups=sub(groups),
                  options=dataclasses.replace(options, holdout=0.0), plan=None)
  except ValueError as e:
    raise ValueError(f'holding out {held.sum()} of {y.size} points leaves {train.sum()} to '
                     f'fit: {e}') from None
  x_test = {key: v[held] for key, v in x.items()}
  pred = fit.predict(x_test)
  rel = pred / y[held] - 1
  residuals = np.log(y[train]) - np.log(fit.predict(x_train))
  ok = fit.ok_samples
  thetas = ok if len(ok) else fit.theta[None]
  log_pred = np.log(laws_lib.predict(law, thetas, x_test)).reshape(len(thetas), -1)
  # At least 1000 draws, so that the residual part is resolved even without a bootstrap.
  log_pred = np.tile(log_pred, (-(-1000 // len(thetas)), 1))
  rng = np.random.default_rng([options.seed, 1])
  draws = log_pred + rng.choice(residuals, size=log_pred.shape)
  lo, hi = _interval(draws, options.level)
  inside = (np.log(y[held]) >= lo) & (np.log(y[held]) <= hi)
  summary = {
      'n_train': int(train.sum()), 'n_test': int(held.sum()),
      'rel_error_mean': float(np.mean(rel)), 'rel_error_rms': float(np.sqrt(np.mean(rel ** 2))),
      'rel_error_max': float(np.max(np.abs(rel))), 'coverage': float(np.mean(inside)),
      'level': options.level, 'train_estimate': fit.estimate,
      'test_rows': np.flatnonzero(held).tolist(), 'test_predicted': pred.tolist(),
      'test_lo': np.exp(lo).tolist(), 'test_hi': np.exp(hi).tolist()}
  return summary, fit


def _validate_costliest(law: laws_lib.Law, x: dict[str, Array], y: Array, groups: Array | None,
                        order_key: Array, ordered_by: str, target: str,
                        options: FitOptions) -> dict[str, Any]:
  """`validate` on the costliest options.holdout of the points by `order_key`."""
  order = np.argsort(order_key, kind='stable')
  n_train = int(math.ceil((1 - options.holdout) * y.size))
  if n_train == y.size:
    raise ValueError(f'holdout={options.holdout} leaves no point to validate on ({y.size} points)')
  summary, _ = validate(law, x, y, order[n_train:], target=target, groups=groups, options=options)
  summary.update(ordered_by=ordered_by, train_max_key=float(order_key[order[:n_train]].max()),
                 test_max_key=float(order_key.max()))
  return summary


# ---- diagnostics ---------------------------------------------------------------

def _diagnostics(law: laws_lib.Law, samples: Array, not_converged: int, spreads: dict,
                 point: PointFit, n_units: int, level: float, validation: dict | None,
                 plan: dict | None) -> list[str]:
  """What a reader of the fit should be told, in words."""
  warnings = []
  intervals = spreads['intervals']
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
  wild = [f"{name} ({spreads['std'][name]:.3g} against {spreads['robust_std'][name]:.3g})"
          for name in spreads['wild']]
  if wild:
    warnings.append(f'bootstrap standard deviations over {WILD_SPREAD_WARNING:g}x the robust '
                    f'spread, so made by a few wild replicates: {", ".join(wild)}; read the '
                    'intervals and the robust spreads instead')
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
    robust_std: reported name -> 1.4826 x the bootstrap's median absolute deviation.
    correlation: bootstrap correlation of the raw parameters, `[n_params, n_params]`.
    samples: raw parameters of every bootstrap replicate (NaN rows: failed refits).
    objective: the minimised objective.
    converged: whether the polish converged (see `PointFit`).
    n_points: data points fitted; n_units: bootstrap clusters.
    options: the fitting options as given.
    delta: Huber's delta used (None for the other losses).
    residual_scale: the robust scale of the least-squares residuals that delta
      was taken from (None when delta was given).
    clustered: whether the bootstrap resampled groups rather than points.
    target: the name of the fitted quantity (loss, fvu, ...).
    plan: compute-optimal plan and extrapolation tables (see `fit_law`), or None.
    validation: hold-out validation summary (see `validate`), or None.
    warnings: diagnostics, in words.
    inputs: the law's inputs as fitted (name -> array); y: the target.
    compute: the compute model of the plan, or None; fixed: the plan's other inputs.
  """
  law: laws_lib.Law
  theta: Array
  estimate: dict[str, float]
  intervals: dict[str, tuple[float, float]]
  std: dict[str, float]
  robust_std: dict[str, float]
  correlation: Array
  samples: Array
  objective: float
  converged: bool
  n_points: int
  n_units: int
  options: FitOptions
  delta: float | None
  residual_scale: float | None
  clustered: bool
  target: str
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
    """Predicted target at `inputs` (name -> array) with the point estimate."""
    return laws_lib.predict(self.law, self.theta, inputs)

  def predict_samples(self, inputs: Mapping[str, Any]) -> Array:
    """Predicted target for every successful bootstrap replicate, `[n_ok, n_points]`."""
    ok = self.ok_samples
    if not len(ok):
      return np.zeros((0, np.size(next(iter(inputs.values())))))
    return laws_lib.predict(self.law, ok, inputs)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready summary (NaN written as null)."""
    settings = dict(self.options.to_dict(), delta_used=self.delta,
                    residual_scale=self.residual_scale, clustered=self.clustered)
    return _jsonable({
        'law': self.law.name, 'formula': self.law.formula, 'params': list(self.law.params),
        'target': self.target, 'estimate': self.estimate, 'intervals': self.intervals,
        'std': self.std, 'robust_std': self.robust_std,
        'raw_estimate': dict(zip(self.law.params, self.theta)),
        'correlation': self.correlation, 'bootstrap_samples': self.samples,
        'objective': self.objective, 'converged': self.converged, 'n_points': self.n_points,
        'n_units': self.n_units, 'settings': settings, 'validation': self.validation,
        'plan': self.plan, 'warnings': self.warnings,
        'compute': None if self.compute is None else dataclasses.asdict(self.compute),
        'fixed': self.fixed})

  def report(self) -> str:
    """A readable multi-line report."""
    return report_lib.report(self)


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


# ---- the fit -------------------------------------------------------------------

def _row_flops(row_compute: Any, compute: laws_lib.ComputeModel | None, law: laws_lib.Law,
               x: dict[str, Array], y: Array) -> Array | None:
  """FLOPs of each point: given, else from the compute model when the law has n and D."""
  if row_compute is not None:
    flops = np.asarray(row_compute, dtype=np.float64).reshape(-1)
    if flops.shape != y.shape or not np.all(np.isfinite(flops) & (flops > 0)):
      raise ValueError(f'row_compute must be {y.size} finite positive FLOP counts')
    return flops
  if compute is not None and {'n_latents', 'tokens'} <= set(law.inputs):
    return compute.flops(x['n_latents'], x['tokens'])
  return None


def _plan_fixed(law: laws_lib.Law, x: dict[str, Array], fixed: Mapping[str, float] | None):
  """The plan's values of the inputs other than n and D: given, else the most common."""
  out = dict(fixed or {})
  for name in law.inputs:
    if name not in ('n_latents', 'tokens') and name not in out:
      values, counts = np.unique(x[name], return_counts=True)
      out[name] = float(values[np.argmax(counts)])
  return out


@optimize.one_blas_thread()
def fit_law(law: laws_lib.Law | str, inputs: Mapping[str, Any], y: Any, *, target: str = 'loss',
            groups: Any = None, row_compute: Any = None, options: FitOptions = FitOptions(),
            plan: PlanOptions | None = PlanOptions()) -> 'FitResult':
  """Fits a scaling law with bootstrap intervals, validation, diagnostics and a plan.

  Args:
    law: a `laws.Law` or the name of a built-in one ('power', 'chinchilla', 'openai').
    inputs: name -> array, one value per data point (e.g. 'n_latents', 'tokens', 'k').
    y: the target per point (loss, FVU, MSE), positive.
    target: the target's name, for reports, plots and messages.
    groups: optional cluster id per point (run, seed); the bootstrap resamples
      whole clusters. Without it each point is its own run.
    row_compute: optional FLOPs of each point (orders the hold-out, sets default budgets).
    options: how to fit, bootstrap and validate (`FitOptions`). The hold-out
      points are the costliest by `row_compute`, else by the plan's compute
      model, else by n_latents.
    plan: what to plan (`PlanOptions`); None: no plan.

  Returns:
    A `FitResult`. `plan['budgets']` rows hold the compute-optimal n_latents,
    tokens, loss and local exponents a, b (n_opt ~ C^a, D_opt ~ C^b) per budget;
    `plan['targets']` rows the tokens, FLOPs and loss at which each target size
    is compute-optimal (or, for laws without tokens, the predicted loss); every
    quantity as {'estimate', 'lo', 'hi'}.

  Raises:
    ValueError: unknown law; missing inputs (listed with those present);
      non-positive or non-finite values; too few runs for the parameters.
  """
  law = _resolve(law)
  x, y, groups = optimize.check_inputs(law, inputs, y, groups, target)
  compute = plan.compute if plan is not None else None
  flops = _row_flops(row_compute, compute, law, x, y)
  rng = np.random.default_rng(options.seed)
  est = _point_estimate(law, x, y, options, rng)
  samples, not_converged = optimize.bootstrap(est.problem, est.point, options.n_boot, groups, rng,
                                              options.bootstrap_starts)
  spreads = bootstrap_spreads(law, samples, options.level)
  fixed = _plan_fixed(law, x, plan.fixed if plan is not None else None)
  validation = None
  if options.holdout > 0:
    key, by = (flops, 'flops') if flops is not None else (x['n_latents'], 'n_latents')
    validation = _validate_costliest(law, x, y, groups, key, by, target, options)
  table = None
  if plan is not None and 'n_latents' in law.inputs:
    table = _plan(law, est.point.theta, samples, options.level, compute, plan.budgets,
                  plan.targets, fixed, float(x['n_latents'].max()),
                  None if flops is None else float(flops.max()))
  n_units = y.size if groups is None else len(np.unique(groups))
  warnings = _diagnostics(law, samples, not_converged, spreads, est.point, n_units,
                          options.level, validation, table)
  for w in warnings:  # in the result and its report; the log keeps them too
    log.info('%s fit: %s', law.name, w)
  return FitResult(
      law=law, theta=est.point.theta,
      estimate={n: float(v) for n, v in zip(law.display_names, law.natural(est.point.theta))},
      intervals=spreads['intervals'], std=spreads['std'], robust_std=spreads['robust_std'],
      correlation=spreads['correlation'], samples=samples, objective=est.point.objective,
      converged=est.point.converged, n_points=y.size, n_units=n_units, options=options,
      delta=est.problem.delta if options.loss == 'huber' else None,
      residual_scale=est.residual_scale, clustered=groups is not None, target=target,
      plan=table, validation=validation, warnings=warnings, inputs=x, y=y, compute=compute,
      fixed=fixed)
