"""Fit a scaling law on all but the largest dictionary of a sweep, and predict that one.

    python tools/scaling_holdout.py runs/sweep_smollm2/results.jsonl [--target fvu]
                                   [--form chinchilla] [--n-boot 200]

Prints the law fitted on the smaller dictionaries (with bootstrap intervals),
then, for every evaluation point of the largest dictionary, the prediction with
its 95% bootstrap interval, the measured value and the relative error.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from dictlearn.scaling import fit as fit_lib  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('results')
  p.add_argument('--target', default='fvu')
  p.add_argument('--form', default='chinchilla', choices=('chinchilla', 'power'))
  p.add_argument('--n-boot', type=int, default=200)
  args = p.parse_args(argv)
  with open(args.results, encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  n = np.array([r['n_latents'] for r in records], float)
  tokens = np.array([r['tokens'] for r in records], float)
  y = np.array([r[args.target] for r in records], float)
  runs = np.array([r['run'] for r in records])
  largest = n == n.max()
  inputs = {'n_latents': n, 'tokens': tokens} if args.form == 'chinchilla' else {'n_latents': n}
  train = {k: v[~largest] for k, v in inputs.items()}
  # Points of one run share its data order, so runs are the natural bootstrap
  # clusters; with fewer runs than parameters + 1 the points are resampled instead.
  groups = runs[~largest] if len(set(runs[~largest])) > len(inputs) + 3 else None
  result = fit_lib.fit_law(args.form, train, y[~largest], n_boot=args.n_boot, groups=groups)
  print(f'fitted on {int((~largest).sum())} points with n_latents < {int(n.max())}:')
  print(result.report())
  test = {k: v[largest] for k, v in inputs.items()}
  predicted = result.predict(test)
  samples = result.predict_samples(test)
  lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
  errors = (predicted - y[largest]) / y[largest]
  print(f'\nprediction of the held-out n_latents={int(n.max())} ({args.target}):')
  print(f'{"tokens":>10s} {"measured":>10s} {"predicted":>10s} {"95% interval":>22s} {"rel. error":>10s}')
  for d, m, pr, a, b, e in zip(tokens[largest], y[largest], predicted, lo, hi, errors):
    inside = 'inside' if a <= m <= b else 'outside'
    print(f'{int(d):>10d} {m:10.4f} {pr:10.4f}   [{a:8.4f}, {b:8.4f}] {100 * e:+9.2f}%  {inside}')
  print(f'relative error: mean {100 * np.mean(np.abs(errors)):.2f}%, '
        f'max {100 * np.max(np.abs(errors)):.2f}%')
  return 0


if __name__ == '__main__':
  sys.exit(main())
