"""Scaling-law forms, the training-compute formula, and the compute-optimal calculus.

A `Law` predicts the log of a loss from named inputs (`n_latents`, `tokens`,
`k`). Positive coefficients are fitted through their logs (A = exp(a)), so every
prediction is a log-sum-exp of affine terms and stays finite and positive. The
built-in forms:

    power       L(n)    = E + A n^-alpha
    chinchilla  L(n, D) = E + A n^-alpha + B D^-beta
                log L   = LSE(a - alpha log n, b - beta log D, e)   (Hoffmann 2022; Besiroglu 2024)
    openai      L(n, k) = exp(alpha + beta_k ln k + beta_n ln n + gamma ln k ln n)
                          + exp(zeta + eta ln k)
                (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")

Training compute is defined in ONE place, `sae_training_flops` (from
`dictlearn.sae.flops`, where the trainer's MFU reads it too; `lm_training_flops`
for language models); `ComputeModel` wraps it for the plan.
The compute-optimal functions below minimise the law's prediction along a curve
of constant compute; they are written in jax so that they vectorise over
bootstrap replicates.
"""
import dataclasses
import functools
import itertools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.sae import flops

LogPredict = Callable[[Mapping[str, jax.Array], Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Law:
  """A parametric scaling law, fitted in log space.

  Attributes:
    name: short name, e.g. 'chinchilla'.
    params: names of the fitted parameters, in the order of the parameter vector.
    inputs: names of the inputs the law reads, e.g. ('n_latents', 'tokens').
    log_predict: `(params, inputs) -> log(loss)`: `params` maps each name in
      `params` to a scalar, `inputs` maps each name in `inputs` to an array. It
      must be written with `jax.numpy` (it is differentiated and vectorised with
      jax); plain-numpy code fails when traced.
    grid: initial values of each parameter; the multi-start grid is their product.
    log_params: parameters that are logs of positive coefficients, mapped to the
      coefficient's name ({'a': 'A'}); reported as exp(value).
    formula: the law in words, for reports.
  """
  name: str
  params: tuple[str, ...]
  inputs: tuple[str, ...]
  log_predict: LogPredict
  grid: Mapping[str, Sequence[float]]
  log_params: Mapping[str, str] = dataclasses.field(default_factory=dict)
  formula: str = ''

  def __post_init__(self):
    object.__setattr__(self, 'params', tuple(self.params))
    object.__setattr__(self, 'inputs', tuple(self.inputs))
    if len(set(self.params)) != len(self.params) or not self.params:
      raise ValueError(f'Law {self.name!r}: params must be non-empty and unique, got {self.params}')
    if not self.inputs:
      raise ValueError(f'Law {self.name!r}: inputs must name at least one input column')
    if set(self.grid) != set(self.params):
      raise ValueError(f'Law {self.name!r}: grid must give initial values for exactly the params '
                       f'{list(self.params)}, got {sorted(self.grid)}')
    if any(len(v) == 0 for v in self.grid.values()):
      raise ValueError(f'Law {self.name!r}: every grid entry needs at least one value')
    unknown = set(self.log_params) - set(self.params)
    if unknown:
      raise ValueError(f'Law {self.name!r}: log_params {sorted(unknown)} are not among the params '
                       f'{list(self.params)}')

  @property
  def n_params(self) -> int:
    return len(self.params)

  @property
  def display_names(self) -> tuple[str, ...]:
    """Reported names: the coefficient's name for log parameters (A for a), else the name."""
    return tuple(self.log_params.get(p, p) for p in self.params)

  def grid_points(self) -> np.ndarray:
    """The product of the per-parameter initial values, `[n_points, n_params]`."""
    return np.array(list(itertools.product(*[self.grid[p] for p in self.params])), dtype=np.float64)

  def natural(self, theta: np.ndarray) -> np.ndarray:
    """Parameters on the reported scale (exp of the log parameters); any leading shape."""
    theta = np.asarray(theta, dtype=np.float64)
    out = theta.copy()
    for i, p in enumerate(self.params):
      if p in self.log_params:
        out[..., i] = np.exp(theta[..., i])
    return out

  def log_loss(self, theta: jax.Array, inputs: Mapping[str, jax.Array]) -> jax.Array:
    """log L at `inputs` for one parameter vector `theta` (jax-traceable)."""
    return self.log_predict({p: theta[i] for i, p in enumerate(self.params)}, inputs)


# ---- built-in forms --------------------------------------------------------

_HOFFMANN_EXPONENTS = (0.0, 0.5, 1.0, 1.5, 2.0)
_HOFFMANN_LOG_COEF = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
_HOFFMANN_LOG_E = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
# SAE targets (FVU, normalised MSE) sit far below a language model's 2-5 nats,
# so the irreducible term also gets starts down to exp(-6) = 0.0025.
_LOG_E = (-6.0, -4.0, -2.0) + _HOFFMANN_LOG_E


def _power(p, x):
  return jnp.logaddexp(p['a'] - p['alpha'] * jnp.log(x['n_latents']), p['e'])


def _chinchilla(p, x):
  terms = jnp.stack(jnp.broadcast_arrays(p['a'] - p['alpha'] * jnp.log(x['n_latents']),
                                         p['b'] - p['beta'] * jnp.log(x['tokens']), p['e']))
  return jax.nn.logsumexp(terms, axis=0)


def _openai(p, x):
  log_n, log_k = jnp.log(x['n_latents']), jnp.log(x['k'])
  reducible = (p['alpha'] + p['beta_k'] * log_k + p['beta_n'] * log_n
               + p['gamma'] * log_k * log_n)
  return jnp.logaddexp(reducible, p['zeta'] + p['eta'] * log_k)


POWER = Law(
    name='power', params=('a', 'alpha', 'e'), inputs=('n_latents',), log_predict=_power,
    grid={'a': _HOFFMANN_LOG_COEF, 'alpha': _HOFFMANN_EXPONENTS, 'e': _LOG_E},
    log_params={'a': 'A', 'e': 'E'}, formula='L(n) = E + A n^-alpha')

CHINCHILLA = Law(
    name='chinchilla', params=('a', 'b', 'e', 'alpha', 'beta'), inputs=('n_latents', 'tokens'),
    log_predict=_chinchilla,
    grid={'a': _HOFFMANN_LOG_COEF, 'b': _HOFFMANN_LOG_COEF, 'e': _LOG_E,
          'alpha': _HOFFMANN_EXPONENTS, 'beta': _HOFFMANN_EXPONENTS},
    log_params={'a': 'A', 'b': 'B', 'e': 'E'}, formula='L(n, D) = E + A n^-alpha + B D^-beta')

OPENAI = Law(
    name='openai', params=('alpha', 'beta_k', 'beta_n', 'gamma', 'zeta', 'eta'),
    inputs=('n_latents', 'k'), log_predict=_openai,
    grid={'alpha': (-4.0, -2.0, 0.0, 2.0), 'beta_k': (-1.0, -0.5, 0.0), 'beta_n': (-1.0, -0.5, 0.0),
          'gamma': (-0.1, 0.0, 0.1), 'zeta': (-8.0, -5.0, -2.0), 'eta': (-1.0, -0.5, 0.0)},
    formula=('L(n, k) = exp(alpha + beta_k ln k + beta_n ln n + gamma ln k ln n)'
             ' + exp(zeta + eta ln k)'))

LAWS = {law.name: law for law in (POWER, CHINCHILLA, OPENAI)}


def get_law(name: str) -> Law:
  """The built-in law called `name`.

  Raises:
    ValueError: no law has that name (the message lists the valid ones).
  """
  if name not in LAWS:
    raise ValueError(f'unknown scaling-law form {name!r}; valid forms: {sorted(LAWS)}')
  return LAWS[name]


# ---- training compute --------------------------------------------------------

# The SAE formula lives beside the SAEs (`dictlearn.sae.flops`), so that the trainer's
# MFU and the sweep's compute axis count the same FLOPs; it is re-exported here.
sae_training_flops = flops.sae_training_flops


def lm_training_flops(n_params, tokens):
  """Language-model training FLOPs, C = 6 N D (Kaplan 2020; Hoffmann 2022)."""
  return 6.0 * n_params * tokens


COMPUTE_KINDS = ('sae', 'sae_sparse', 'lm')


@dataclasses.dataclass(frozen=True)
class ComputeModel:
  """Training compute as a function of size and tokens, C(n, D) = flops_per_token(n) * D.

  Attributes:
    kind: 'sae' (dense kernels), 'sae_sparse' (sparse kernels), or 'lm' (6 N D).
    d_model: activation width; required for the SAE kinds.
    k: active latents per token; required for 'sae_sparse'.
  """
  kind: str = 'sae'
  d_model: float | None = None
  k: float | None = None

  def __post_init__(self):
    if self.kind not in COMPUTE_KINDS:
      raise ValueError(f'unknown compute kind {self.kind!r}; expected one of {COMPUTE_KINDS}')
    if self.kind != 'lm' and (self.d_model is None or self.d_model <= 0):
      raise ValueError(f'compute kind {self.kind!r} needs d_model > 0, got {self.d_model}')
    if self.kind == 'sae_sparse' and (self.k is None or self.k <= 0):
      raise ValueError(f"compute kind 'sae_sparse' needs k > 0, got {self.k}")

  def flops(self, n, tokens):
    """Training FLOPs of a size-`n` model trained on `tokens` tokens."""
    if self.kind == 'lm':
      return lm_training_flops(n, tokens)
    return sae_training_flops(n, tokens, self.d_model, k=self.k,
                              sparse_decode=self.kind == 'sae_sparse')

  def flops_per_token(self, n):
    return self.flops(n, 1.0)

  def describe(self) -> str:
    if self.kind == 'lm':
      return 'C = 6 N D'
    if self.kind == 'sae':
      return f'C = 10 d n D (dense kernels, d = {self.d_model:g})'
    return f'C = (2 d n + 8 d k) D (sparse kernels, d = {self.d_model:g}, k = {self.k:g})'


# ---- compute-optimal calculus ----------------------------------------------
# Along a curve of constant compute C, D = C / f(n) with f = flops_per_token, so
# the loss is a function of u = log n alone: g(u) = log L(e^u, C / f(e^u)). Its
# minimiser is found on a grid (robust to several local minima) and refined by
# bisection on g'(u). Everything is vmapped over parameter vectors.

_GRID_POINTS = 257
_BISECTIONS = 60
_MAX_LOG_TOKENS = 120.0
_PAIRS = 512  # (theta, budget) pairs per call of the jitted solvers


def _check_plannable(law: Law):
  missing = {'n_latents', 'tokens'} - set(law.inputs)
  if missing:
    raise ValueError(f'law {law.name!r} has no {sorted(missing)} input, so it has no '
                     f'compute-optimal frontier; its inputs are {list(law.inputs)}')


def _iso_compute_log_loss(law, compute):
  """g(theta, u, log C, fixed) = log L at n = e^u, D = C / f(n)."""
  def g(theta, u, log_c, fixed):
    n = jnp.exp(u)
    tokens = jnp.exp(log_c) / compute.flops_per_token(n)
    return law.log_loss(theta, {**fixed, 'n_latents': n, 'tokens': tokens})
  return g


def _bracket_and_bisect(value, slope, lo, hi):
  """Minimiser of `value(u)` on [lo, hi]: best grid point, then bisection on `slope`.

  Returns NaN where the minimum is at an end of the interval (no interior optimum).
  """
  us = jnp.linspace(lo, hi, _GRID_POINTS)
  vals = jax.vmap(value)(us)
  vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
  i = jnp.argmin(vals)
  interior = (i > 0) & (i < _GRID_POINTS - 1)
  left = us[jnp.clip(i - 1, 0, _GRID_POINTS - 1)]
  right = us[jnp.clip(i + 1, 0, _GRID_POINTS - 1)]

  def step(_, bounds):
    a, b = bounds
    mid = 0.5 * (a + b)
    up = slope(mid) > 0
    return jnp.where(up, a, mid), jnp.where(up, mid, b)

  a, b = jax.lax.fori_loop(0, _BISECTIONS, step, (left, right))
  return jnp.where(interior, 0.5 * (a + b), jnp.nan)


def _as_fixed(fixed):
  return {key: jnp.asarray(v, dtype=jnp.float64) for key, v in (fixed or {}).items()}


@functools.lru_cache(maxsize=64)
def _compute_optimal_fn(law: Law, compute: ComputeModel):
  """Jitted (thetas [m, p], log budgets [m], fixed) -> n, tokens, loss, each [m]."""
  g = _iso_compute_log_loss(law, compute)
  dg = jax.grad(g, argnums=1)

  def one(theta, log_c, fixed):
    # n runs from 1 up to the size whose single token already costs C (D >= 1).
    u = _bracket_and_bisect(lambda v: g(theta, v, log_c, fixed),
                            lambda v: dg(theta, v, log_c, fixed), 0.0, _log_n_max(compute, log_c))
    n = jnp.exp(u)
    tokens = jnp.exp(log_c) / compute.flops_per_token(n)
    return n, tokens, jnp.exp(g(theta, u, log_c, fixed))

  return jax.jit(jax.vmap(one, (0, 0, None)))


def _over_pairs(fn, thetas, values, fixed) -> list[np.ndarray]:
  """Applies a jitted per-(theta, value) function to every pair, `[n_thetas, n_values]` each.

  The pairs go through in chunks of one fixed size, so the function compiles once
  whatever the number of replicates, budgets or sizes.
  """
  thetas = np.atleast_2d(np.asarray(thetas, dtype=np.float64))
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  m, b = thetas.shape[0], values.size
  ti, vi = (a.ravel() for a in np.meshgrid(np.arange(m), np.arange(b), indexing='ij'))
  total = ti.size
  padded = -(-total // _PAIRS) * _PAIRS
  ti = np.concatenate([ti, np.zeros(padded - total, dtype=int)])
  vi = np.concatenate([vi, np.zeros(padded - total, dtype=int)])
  chunks = []
  with jax.enable_x64(True):
    fixed = _as_fixed(fixed)
    for i in range(0, padded, _PAIRS):
      out = fn(jnp.asarray(thetas[ti[i:i + _PAIRS]]), jnp.asarray(values[vi[i:i + _PAIRS]]), fixed)
      chunks.append([np.asarray(o) for o in out])
  return [np.concatenate(parts)[:total].reshape(m, b) for parts in zip(*chunks)]


def compute_optimal(law: Law, thetas: np.ndarray, budgets: np.ndarray, compute: ComputeModel,
                    fixed: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
  """The (n, D) minimising the predicted loss at each compute budget.

  Args:
    law: a law with `n_latents` and `tokens` inputs.
    thetas: parameter vectors, `[n_params]` or `[n_thetas, n_params]`.
    budgets: compute budgets C in FLOPs, `[n_budgets]`.
    compute: how C depends on (n, D).
    fixed: values of the law's other inputs (e.g. k).

  Returns:
    'n_latents', 'tokens', 'loss', each `[n_thetas, n_budgets]` (leading axis
    dropped for a single theta); NaN where the optimum is not interior (it would
    need n < 1 or D < 1: the law does not trade n against D there).
  """
  _check_plannable(law)
  n, tokens, loss = _over_pairs(_compute_optimal_fn(law, compute), thetas,
                                np.log(np.asarray(budgets, dtype=np.float64)), fixed)
  out = {'n_latents': np.asarray(n), 'tokens': np.asarray(tokens), 'loss': np.asarray(loss)}
  if np.ndim(thetas) == 1:
    out = {key: v[0] for key, v in out.items()}
  return out


def _log_n_max(compute: ComputeModel, log_c):
  """log of the largest n with flops_per_token(n) <= C (so that D >= 1); f is affine in n."""
  f0 = compute.flops_per_token(0.0)
  f1 = compute.flops_per_token(1.0) - f0
  return jnp.log(jnp.maximum(jnp.exp(log_c) - f0, 1.0) / f1)


def frontier_exponents(law: Law, thetas: np.ndarray, budgets: np.ndarray, compute: ComputeModel,
                       fixed: Mapping[str, float] | None = None,
                       step: float = 0.1) -> dict[str, np.ndarray]:
  """Local exponents of the frontier, n_opt ~ C^a and D_opt ~ C^b, at each budget.

  Central differences of log n_opt and log D_opt in log C (exact for a pure power
  law such as Chinchilla's with C proportional to n D, where a = beta / (alpha + beta)).

  Returns:
    'a', 'b', shaped like `compute_optimal`'s outputs.
  """
  budgets = np.asarray(budgets, dtype=np.float64)
  hi = compute_optimal(law, thetas, budgets * np.exp(step), compute, fixed)
  lo = compute_optimal(law, thetas, budgets * np.exp(-step), compute, fixed)
  return {'a': (np.log(hi['n_latents']) - np.log(lo['n_latents'])) / (2 * step),
          'b': (np.log(hi['tokens']) - np.log(lo['tokens'])) / (2 * step)}


@functools.lru_cache(maxsize=64)
def _optimal_tokens_fn(law: Law, compute: ComputeModel):
  """Jitted (thetas [m, p], log sizes [m], fixed) -> tokens, flops, loss, each [m]."""
  def log_l(theta, u, v, fixed):
    return law.log_loss(theta, {**fixed, 'n_latents': jnp.exp(u), 'tokens': jnp.exp(v)})

  d_u, d_v = jax.grad(log_l, argnums=1), jax.grad(log_l, argnums=2)
  elasticity = jax.grad(lambda u: jnp.log(compute.flops_per_token(jnp.exp(u))))

  def one(theta, u, fixed):
    # h > 0: at this D the iso-compute loss still falls towards smaller n (too few tokens).
    h = lambda v: d_u(theta, u, v, fixed) - elasticity(u) * d_v(theta, u, v, fixed)
    lo, hi = jnp.asarray(0.0), jnp.asarray(_MAX_LOG_TOKENS)
    ok = (h(lo) > 0) & (h(hi) < 0)

    def step(_, bounds):
      a, b = bounds
      mid = 0.5 * (a + b)
      pos = h(mid) > 0
      return jnp.where(pos, mid, a), jnp.where(pos, b, mid)

    a, b = jax.lax.fori_loop(0, _BISECTIONS, step, (lo, hi))
    v = jnp.where(ok, 0.5 * (a + b), jnp.nan)
    tokens = jnp.exp(v)
    return tokens, compute.flops(jnp.exp(u), tokens), jnp.exp(log_l(theta, u, v, fixed))

  return jax.jit(jax.vmap(one, (0, 0, None)))


def optimal_tokens_for_size(law: Law, thetas: np.ndarray, n_latents: np.ndarray,
                            compute: ComputeModel,
                            fixed: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
  """For each size n, the tokens D at which n is the compute-optimal size.

  n is optimal for C = C(n, D) when the loss is stationary along that iso-compute
  curve: d log L / d log n - e(n) d log L / d log D = 0, with e = d log f / d log n
  the elasticity of the per-token cost. Solved by bisection in log D over
  [0, 120] (D from 1 to e^120).

  Returns:
    'tokens', 'flops', 'loss', each `[n_thetas, n_sizes]` (leading axis dropped for a
    single theta); NaN where no such D exists.
  """
  _check_plannable(law)
  tokens, flops, loss = _over_pairs(_optimal_tokens_fn(law, compute), thetas,
                                    np.log(np.asarray(n_latents, dtype=np.float64)), fixed)
  out = {'tokens': np.asarray(tokens), 'flops': np.asarray(flops), 'loss': np.asarray(loss)}
  if np.ndim(thetas) == 1:
    out = {key: v[0] for key, v in out.items()}
  return out


@functools.lru_cache(maxsize=64)
def _predict_fn(law: Law):
  return jax.jit(jax.vmap(law.log_loss, (0, None)))


def _bucket(n: int, least: int = 8) -> int:
  """Next power of two: calls of similar size share one compiled function."""
  return max(least, 1 << (max(n, 1) - 1).bit_length())


def predict(law: Law, thetas: np.ndarray, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
  """Predicted loss (not its log) at `inputs` for one or many parameter vectors.

  Returns:
    `[n_points]` for one theta, `[n_thetas, n_points]` for several.
  """
  t = np.atleast_2d(np.asarray(thetas, dtype=np.float64))
  x = {key: np.asarray(v, dtype=np.float64).reshape(-1) for key, v in inputs.items()}
  n = max((v.size for v in x.values()), default=0)
  x = {key: np.broadcast_to(v, (n,)) for key, v in x.items()}
  # Pad parameters and points (repeating the first) to powers of two.
  m, size_t, size_x = t.shape[0], _bucket(t.shape[0], 1), _bucket(n)
  t = np.concatenate([t, np.repeat(t[:1], size_t - m, axis=0)])
  x = {key: np.concatenate([v, np.full(size_x - n, v[0] if n else 1.0)]) for key, v in x.items()}
  with jax.enable_x64(True), np.errstate(over='ignore'):  # a wild replicate may overflow: inf
    out = np.exp(np.asarray(_predict_fn(law)(jnp.asarray(t), _as_fixed(x))))[:m, :n]
  return out[0] if np.ndim(thetas) == 1 else out
