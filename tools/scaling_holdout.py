"""Fit a scaling law on all but the largest dictionaries of a sweep, and predict those.

    python tools/scaling_holdout.py runs/sweep_smollm2/results.jsonl [--target fvu]
        [--form chinchilla|power|openai] [--holdout-largest K] [--where 'k==32'] [--n-boot 200]

Prints the law fitted on the smaller dictionaries (with bootstrap intervals),
then, for every point of the K largest sizes (default 1), the prediction with
its prediction interval (bootstrap parameters plus the training residuals'
scatter, as `dictlearn.scaling.validate` computes it), the measured value and
the relative error. The law's inputs are read from the columns of the same
names (n_latents, tokens, k); runs (the `run` column, when there are enough
of them) are the bootstrap clusters.
"""
import sys

import numpy as np

from dictlearn import cli
from dictlearn import scaling
from dictlearn.scaling import records as records_lib


def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='python tools/scaling_holdout.py', description=__doc__)
  p.add_argument('results', help='JSONL or CSV results file (the sweep writes results.jsonl)')
  p.add_argument('--target', default='fvu', help='column to fit (fvu, loss, mse, ...)')
  p.add_argument('--form', default='chinchilla', choices=sorted(scaling.LAWS),
                 help='law to fit')
  p.add_argument('--holdout-largest', type=int, default=1, metavar='K',
                 help='hold out the K largest dictionary sizes (default 1)')
  p.add_argument('--where', action='append', default=[], metavar='COND',
                 type=records_lib.where_flag, help="use only the records where COND holds, e.g. 'k==32' (repeatable)")
  p.add_argument('--n-boot', type=int, default=200, help='bootstrap replicates')
  p.add_argument('--delta', type=float, default=None,
                 help='Huber delta on log residuals (default: from the data)')
  p.add_argument('--n-starts', type=int, default=128, help='local fits from the grid (0: all)')
  p.add_argument('--seed', type=int, default=0)
  return p


def run(args) -> int:
  """Fits, predicts and prints."""
  law = scaling.get_law(args.form)
  options = scaling.FitOptions(n_boot=args.n_boot, delta=args.delta, seed=args.seed,
                               n_starts=args.n_starts or None)
  records, _ = records_lib.load_records(args.results)
  records = records_lib.select(records, args.where, args.results)
  inputs = records_lib.law_inputs(records, law.inputs, args.results)
  y = records_lib.column(records, args.target, args.results)
  test = scaling.holdout_largest(inputs['n_latents'], args.holdout_largest)
  groups = None
  if all('run' in r for r in records):
    runs = np.array([str(r['run']) for r in records])
    # Points of one run share its data order, so runs are the natural bootstrap
    # clusters; with few runs the points are resampled instead.
    if len(set(runs[~test])) > law.n_params + 3:
      groups = runs
  summary, fit = scaling.validate(law, inputs, y, test, target=args.target, groups=groups,
                                  options=options)
  sizes = np.unique(inputs['n_latents'][test])
  print(f'fitted on {summary["n_train"]} points with n_latents < {sizes.min():.0f}:')
  print(fit.report())
  others = [name for name in law.inputs if name != 'n_latents']
  level = f'{options.level:.0%} interval'
  print(f'\nprediction of the held-out n_latents in {sizes.astype(int).tolist()} ({args.target}):')
  print(' '.join(f'{name:>10s}' for name in ['n_latents'] + others)
        + f' {"measured":>10s} {"predicted":>10s} {level:>22s} {"rel. error":>10s}')
  rows = summary['test_rows']
  errors = []
  for row, pred, lo, hi in zip(rows, summary['test_predicted'], summary['test_lo'],
                               summary['test_hi']):
    measured = y[row]
    errors.append(pred / measured - 1)
    inside = 'inside' if lo <= measured <= hi else 'outside'
    print(' '.join(f'{inputs[name][row]:>10.4g}' for name in ['n_latents'] + others)
          + f' {measured:10.4f} {pred:10.4f}   [{lo:8.4f}, {hi:8.4f}] {100 * errors[-1]:+9.2f}%  '
          + inside)
  print(f'relative error: mean |e| {100 * np.mean(np.abs(errors)):.2f}%, '
        f'max {100 * np.max(np.abs(errors)):.2f}%; intervals cover {summary["coverage"]:.0%}')
  return 0


def main(argv=None) -> int:
  return cli.run_tool(run, _parser(), argv)


if __name__ == '__main__':
  sys.exit(main())
