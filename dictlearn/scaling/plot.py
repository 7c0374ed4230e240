"""Plots of a fitted scaling law (matplotlib, Agg backend, PNG files).

    plot_all(result, 'plots/')  ->  loss_vs_size.png, frontier.png, residuals.png, extrapolation.png
    figures(result)             ->  the same as {file name: matplotlib Figure}

The target axis is named after the fitted target (fvu, loss, ...).

Held-out points (hold-out validation) are drawn hollow; bands are the
bootstrap's percentile intervals at the result's level.
"""
import logging
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top
from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
import numpy as np

from dictlearn.scaling import laws as laws_lib
from dictlearn.scaling.fit import FitResult

_MAX_SERIES = 8
log = logging.getLogger(__name__)


def _heldout_mask(result: FitResult) -> np.ndarray:
  mask = np.zeros(result.y.size, dtype=bool)
  if result.validation is not None:
    mask[result.validation['test_rows']] = True
  return mask


def _series(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Labels each point with a series: its value, or one of up to 8 log-quantile bins."""
  uniq = np.unique(values)
  if uniq.size <= _MAX_SERIES:
    return np.searchsorted(uniq, values), uniq
  edges = np.quantile(np.log(values), np.linspace(0, 1, _MAX_SERIES + 1))
  label = np.clip(np.searchsorted(edges, np.log(values), side='right') - 1, 0, _MAX_SERIES - 1)
  centres = np.array([np.exp(np.median(np.log(values[label == i]))) if np.any(label == i)
                      else np.nan for i in range(_MAX_SERIES)])
  return label, centres


def _band(result: FitResult, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """The percentile band of bootstrap predictions `[n_replicates, n_points]` at the fit's level."""
  if len(samples) < 2:
    return None
  q = 100 * (1 - result.options.level) / 2
  with np.errstate(all='ignore'):
    lo, hi = np.nanpercentile(samples, [q, 100 - q], axis=0)
  return lo, hi


def _loss_vs_size(result: FitResult) -> Figure:
  """The target against n_latents, one colour per token budget (or k), with fitted curves."""
  x, y, held = result.inputs, result.y, _heldout_mask(result)
  n = x['n_latents']
  others = [name for name in result.law.inputs if name != 'n_latents']
  by = 'tokens' if 'tokens' in others else (others[0] if others else None)
  label, centres = _series(x[by]) if by else (np.zeros(y.size, dtype=int), np.array([np.nan]))
  grid_n = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
  fig, ax = plt.subplots(figsize=(7, 5))
  colours = plt.cm.viridis(np.linspace(0, 0.9, len(centres)))
  for i, centre in enumerate(centres):
    sel = label == i
    if not sel.any():
      continue
    name = f'{by} ~ {centre:.3g}' if by else 'data'
    ax.scatter(n[sel & ~held], y[sel & ~held], color=colours[i], s=14, label=name)
    ax.scatter(n[sel & held], y[sel & held], facecolors='none', edgecolors=colours[i], s=18)
    curve_x = {key: np.full_like(grid_n, np.median(x[key][sel])) for key in others}
    curve_x['n_latents'] = grid_n
    ax.plot(grid_n, result.predict(curve_x), color=colours[i], lw=1)
  ax.set(xscale='log', yscale='log', xlabel='n_latents', ylabel=result.target)
  ax.set_title(f'{result.law.name}: {result.law.formula}', fontsize=8)
  _plain_log_axis(ax.yaxis)
  ax.legend(fontsize=7)
  return fig


def _frontier(result: FitResult) -> Figure | None:
  """Compute-optimal n_latents and tokens against the budget, with bootstrap bands."""
  if result.compute is None or not {'n_latents', 'tokens'} <= set(result.law.inputs):
    log.info('no compute-optimal frontier to plot for law %r', result.law.name)
    return None
  data_c = result.compute.flops(result.inputs['n_latents'], result.inputs['tokens'])
  top = max([data_c.max()] + [row['flops'] for row in result.plan.get('budgets', [])])
  budgets = np.geomspace(data_c.min(), top, 40)
  thetas = np.concatenate([result.theta[None], result.ok_samples])
  opt = laws_lib.compute_optimal(result.law, thetas, budgets, result.compute, result.fixed)
  fig, ax = plt.subplots(figsize=(7, 5))
  for key, colour in (('n_latents', 'C0'), ('tokens', 'C1')):
    ax.plot(budgets, opt[key][0], color=colour, label=f'optimal {key}')
    if len(thetas) > 2:
      ax.fill_between(budgets, *_band(result, opt[key][1:]), color=colour, alpha=0.2)
  ax.scatter(data_c, result.inputs['n_latents'], s=6, color='C0', alpha=0.4, label='runs (n)')
  ax.set(xscale='log', yscale='log', xlabel=f'training FLOPs ({result.compute.describe()})',
         ylabel='n_latents / tokens', title='compute-optimal frontier')
  ax.legend(fontsize=8)
  return fig


def _residuals(result: FitResult) -> Figure:
  """Log residuals (data over fit) against the predicted target; held-out points hollow."""
  held = _heldout_mask(result)
  pred = result.predict(result.inputs)
  resid = np.log(result.y) - np.log(pred)
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.scatter(pred[~held], resid[~held], s=12, label='fitted')
  if held.any():
    ax.scatter(pred[held], resid[held], s=16, facecolors='none', edgecolors='C3',
               label='held-out points')
  ax.axhline(0, color='k', lw=0.8)
  ax.set(xscale='log', xlabel=f'predicted {result.target}', ylabel='log(data / fit)',
         title='residuals')
  ax.legend(fontsize=8)
  return fig


def _extrapolation(result: FitResult) -> Figure | None:
  """The predicted target out to the target sizes, with the bootstrap band.

  For laws with tokens, each size is trained for its compute-optimal tokens
  (which needs the compute model); for the others the remaining inputs are held
  at `result.fixed`.
  """
  if 'tokens' in result.law.inputs and result.compute is None:
    log.info('no compute model: no compute-optimal extrapolation to plot')
    return None
  n_data = result.inputs['n_latents']
  targets = [row['n_latents'] for row in (result.plan or {}).get('targets', [])]
  grid_n = np.geomspace(n_data.min(), max([n_data.max()] + targets) * 1.2, 60)
  fig, ax = plt.subplots(figsize=(7, 5))
  shown = np.ones(result.y.size, dtype=bool)
  if 'tokens' in result.law.inputs:
    thetas = np.concatenate([result.theta[None], result.ok_samples])
    loss = laws_lib.optimal_tokens_for_size(result.law, thetas, grid_n, result.compute,
                                            result.fixed)['loss']
    centre, samples = loss[0], loss[1:]
    what = f'{result.target} at compute-optimal tokens'
  else:
    x = {key: np.full_like(grid_n, v) for key, v in result.fixed.items()}
    x['n_latents'] = grid_n
    centre, samples = result.predict(x), result.predict_samples(x)
    what = f'predicted {result.target}' + ''.join(f', {k}={v:g}' for k, v in result.fixed.items())
    # Only the runs at the plotted values of the other inputs.
    for key, v in result.fixed.items():
      shown &= np.isclose(result.inputs[key], v)
  ax.plot(grid_n, centre, color='C0', label=what)
  if len(samples) > 2:
    ax.fill_between(grid_n, *_band(result, samples), color='C0', alpha=0.2,
                    label=f"{result.options.level:.0%} bootstrap band")
  ax.scatter(n_data[shown], result.y[shown], s=10, color='k', alpha=0.6, zorder=3, label='runs')
  for t in targets:
    ax.axvline(t, color='k', lw=0.5, ls=':')
  ax.set(xscale='log', yscale='log', xlabel='n_latents', ylabel=result.target,
         title='extrapolation')
  _plain_log_axis(ax.yaxis)
  ax.legend(fontsize=8)
  return fig


def figures(result: FitResult) -> dict[str, Figure]:
  """Every plot that applies to `result`, by file name (close them with plt.close)."""
  out = {'residuals.png': _residuals(result)}
  if 'n_latents' in result.law.inputs:
    out.update({'loss_vs_size.png': _loss_vs_size(result), 'frontier.png': _frontier(result),
                'extrapolation.png': _extrapolation(result)})
  return {name: fig for name, fig in out.items() if fig is not None}


def plot_all(result: FitResult, directory) -> list[pathlib.Path]:
  """Writes every plot that applies to `result` into `directory` (created)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  return [_save(fig, directory / name) for name, fig in figures(result).items()]


def _plain_log_axis(axis):
  """Plain numbers on a log axis (0.02, 2.4; not 2 x 10^-2), never overlapping.

  Decades are labelled; minor ticks only when the axis spans less than about a
  decade (all of them under 0.4 decades, a few up to 1), so a loss between 2.2
  and 3.5 still gets labels, and an FVU falling from 0.5 to 0.001 does not get
  one label on every minor tick.
  """
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


class _PlainLogFormatter(ticker.LogFormatter):
  """matplotlib's choice of which minor ticks to label, written as plain numbers."""

  def __call__(self, x, pos=None):
    return f'{x:g}' if super().__call__(x, pos) else ''


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
