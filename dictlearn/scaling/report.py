"""The text report of a fitted scaling law (`FitResult.report()`)."""
from typing import Any

import numpy as np


def _q(q: dict[str, Any], fmt: str = '.4g') -> str:
  est, lo, hi = (float(q[k]) for k in ('estimate', 'lo', 'hi'))
  if not np.isfinite(lo):
    return f'{est:{fmt}}'
  return f'{est:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]'


def _fit_lines(r) -> list[str]:
  o = r.options
  if o.loss != 'huber':
    loss = o.loss
  elif r.residual_scale is None:
    loss = f'huber (delta={r.delta:.3g}, given)'
  else:
    loss = (f'huber (delta={r.delta:.3g}: 1.345 x the robust scale {r.residual_scale:.3g} of '
            'least-squares residuals)')
  lines = [f'Scaling law {r.law.name!r} for {r.target}: {r.law.formula}',
           f"Fit: {loss} on log residuals, {'summed' if o.reduction == 'sum' else 'averaged'} "
           f"over {r.n_points} points; objective {r.objective:.6g}; "
           f"{'converged' if r.converged else 'NOT converged'}"]
  if o.n_boot:
    unit = 'clusters' if r.clustered else 'runs'
    lines.append(f'Bootstrap: {len(r.ok_samples)}/{o.n_boot} replicates resampling {r.n_units} '
                 f'{unit}; {o.level:.0%} percentile intervals, robust sd = 1.4826 x MAD')
  return lines


def _parameter_lines(r) -> list[str]:
  pct = f'{r.options.level:.0%}'
  lines = ['', f"{'parameter':<10} {'estimate':>12}   {pct + ' interval':<27} {'robust sd':>10} "
           f"{'boot std':>10}"]
  for name in r.law.display_names:
    lo, hi = r.intervals[name]
    interval = f'[{lo:.4g}, {hi:.4g}]' if np.isfinite(lo) else '-'
    spreads = [f'{v:>10.4g}' if np.isfinite(v) else f"{'-':>10}"
               for v in (r.robust_std[name], r.std[name])]
    lines.append(f'{name:<10} {r.estimate[name]:>12.5g}   {interval:<27} {" ".join(spreads)}')
  return lines


def _validation_lines(r) -> list[str]:
  v = r.validation
  if v is None:
    return []
  return ['', f"Hold-out validation: fitted on the {v['n_train']} cheapest points (by "
          f"{v['ordered_by']} <= {v['train_max_key']:.3g}), scored on the other "
          f"{v['n_test']} (up to {v['test_max_key']:.3g})",
          f"  relative error of the predicted {r.target}: mean {v['rel_error_mean']:+.2%}, "
          f"RMS {v['rel_error_rms']:.2%}, max {v['rel_error_max']:.2%}",
          f"  {v['level']:.0%} prediction intervals cover {v['coverage']:.1%} of the held-out "
          'points']


def _plan_lines(r) -> list[str]:
  p = r.plan
  if p is None:
    return []
  lines = ['']
  if 'note' in p:
    lines.append(f"Plan: {p['note']}")
  if 'exponents' in p:
    e = p['exponents']
    lines.append(f"Compute-optimal frontier ({p['compute']}), at {e['at_flops']:.3g} FLOPs: "
                 f"n_opt ~ C^{_q(e['a'], '.3f')}, D_opt ~ C^{_q(e['b'], '.3f')}")
  if p['budgets']:
    lines.append(f"{'budget FLOPs':>12}  {'n_latents':<30} {'tokens':<30} {r.target:<26}")
    for row in p['budgets']:
      lines.append(f"{row['flops']:>12.3g}  {_q(row['n_latents'], '.3g'):<30} "
                   f"{_q(row['tokens'], '.3g'):<30} {_q(row['loss']):<26}")
  if p['targets']:
    fixed = ', '.join(f'{k}={v:g}' for k, v in p['fixed'].items())
    lines.append(f"Extrapolation{' (' + fixed + ')' if fixed else ''}:")
    if 'tokens' in p['targets'][0]:
      lines.append(f"{'n_latents':>10} {'x data':>7}  {'tokens (compute-optimal)':<30} "
                   f"{'FLOPs':<30} {r.target:<26}")
      for row in p['targets']:
        lines.append(f"{row['n_latents']:>10.3g} {row['extrapolation']:>7.3g}  "
                     f"{_q(row['tokens'], '.3g'):<30} {_q(row['flops'], '.3g'):<30} "
                     f"{_q(row['loss']):<26}")
    else:
      lines.append(f"{'n_latents':>10} {'x data':>7}  {r.target:<26}")
      for row in p['targets']:
        lines.append(f"{row['n_latents']:>10.3g} {row['extrapolation']:>7.3g}  "
                     f"{_q(row['loss']):<26}")
  return lines


def report(r) -> str:
  """A readable multi-line report of a `fit.FitResult`."""
  lines = (_fit_lines(r) + _parameter_lines(r) + _validation_lines(r) + _plan_lines(r)
           + ['', 'Diagnostics:' if r.warnings else 'Diagnostics: none']
           + [f'  - {w}' for w in r.warnings])
  return '\n'.join(lines)
