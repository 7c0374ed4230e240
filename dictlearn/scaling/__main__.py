"""Command line: fit a scaling law to sweep results and plan the next runs.

    python -m dictlearn.scaling fit RESULTS.jsonl --form chinchilla --holdout 0.2 \\
        --d-model 768 --plots plots/ --out fit.json

RESULTS is a JSONL file with one record per (run, eval point), such as the
`results.jsonl` of `python -m dictlearn.scaling.sweep`, or a CSV file. Columns
(renamable with the flags): `n_latents`, `tokens`, the target (`loss`, or
`--target fvu`), and optionally `k`, `seed`, `run`, `d_model` and the FLOPs
(`flops_dense` / `flops_sparse` as the sweep writes them, or `flops`).

Hoffmann et al.'s runs as digitised by Epoch AI (Besiroglu et al. 2024):

    python -m dictlearn.scaling fit svg_extracted_data.csv --form chinchilla \\
        --n-column 'Model Size' --compute-column 'Training FLOP' --tokens-from-compute \\
        --compute lm --drop-highest 5 --delta 1e-3 --targets 1e10,7e10

`--where 'n_latents<=32768'` (repeatable) fits a subset; see
`dictlearn.scaling.records` for the conditions.
"""
import argparse
import json
import pathlib
import sys

import numpy as np

from dictlearn import cli
from dictlearn.scaling import fit as fit_lib
from dictlearn.scaling import laws
from dictlearn.scaling.records import GROUP_COLUMNS, column, default_group_column, law_inputs
from dictlearn.scaling.records import load_records, select, where_flag

def _floats(text: str) -> list[float]:
  try:
    return [float(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m dictlearn.scaling', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  f = sub.add_parser('fit', help='fit a law, bootstrap it, validate it, plan with it')
  f.add_argument('results', help='JSONL (one record per run and eval point) or CSV file')
  f.add_argument('--form', default='chinchilla', choices=sorted(laws.LAWS), help='law to fit')
  f.add_argument('--target', default='loss', help='column to fit (loss, fvu, mse, ...)')
  f.add_argument('--n-column', default='n_latents', help='column of the dictionary (model) size')
  f.add_argument('--tokens-column', default='tokens', help='column of training tokens')
  f.add_argument('--k-column', default='k', help='column of active latents per token')
  f.add_argument('--compute-column', default=None,
                 help='column of training FLOPs: orders the hold-out, sets default budgets, and '
                      'with --tokens-from-compute gives the tokens (default: flops_dense for '
                      '--compute sae, flops_sparse for sae_sparse, else flops, if present)')
  f.add_argument('--group-column', default=None,
                 help=f"bootstrap cluster column; default the first of {list(GROUP_COLUMNS)} "
                      "present; 'none' resamples records")
  f.add_argument('--tokens-from-compute', action='store_true',
                 help='derive tokens D = C / flops_per_token(n) from the compute column '
                      '(D = C / (6 N) with --compute lm)')
  f.add_argument('--compute', default='sae', choices=laws.COMPUTE_KINDS,
                 help='FLOP model: sae (10 d n D), sae_sparse ((2 d n + 8 d k) D), lm (6 N D)')
  f.add_argument('--d-model', type=float, default=None,
                 help='activation width for the SAE FLOP model (default: the d_model column)')
  f.add_argument('--k', type=float, default=None,
                 help='active latents for sae_sparse compute and for plans of laws with k '
                      '(default: the most common k in the data)')
  f.add_argument('--where', action='append', default=[], metavar='COND', type=where_flag,
                 help="fit only the records where COND holds, e.g. 'n_latents<=32768' or "
                      "'k==32' (<=, >=, <, >, ==, !=; repeat for AND)")
  f.add_argument('--drop-highest', type=int, default=0,
                 help='drop this many records with the highest target first (Besiroglu: 5)')
  f.add_argument('--loss', default='huber', choices=fit_lib.LOSSES)
  f.add_argument('--delta', type=float, default=None,
                 help='Huber delta on log residuals (default: from the data, 1.345 x the robust '
                      'scale of least-squares residuals; Besiroglu et al. used 1e-3)')
  f.add_argument('--reduction', default='sum', choices=fit_lib.REDUCTIONS)
  f.add_argument('--n-boot', type=int, default=200, help='bootstrap replicates')
  f.add_argument('--level', type=float, default=0.95, help='interval level')
  f.add_argument('--holdout', type=float, default=0.0,
                 help='fraction of the most expensive records held out for validation')
  f.add_argument('--n-starts', type=int, default=128, help='local fits from the grid (0: all)')
  f.add_argument('--seed', type=int, default=0)
  f.add_argument('--budgets', type=_floats, default=None, help='FLOP budgets, comma-separated')
  f.add_argument('--targets', type=_floats, default=list(fit_lib.DEFAULT_TARGETS),
                 help='sizes to extrapolate to, comma-separated (default 1e6,4e6,16e6,34e6)')
  f.add_argument('--plots', default=None, help='directory for PNG plots')
  f.add_argument('--out', default=None, help='JSON file for the result')
  return parser


def _compute_model(args, records, path) -> laws.ComputeModel | None:
  if args.compute == 'lm':
    return laws.ComputeModel('lm')
  d_model = args.d_model
  if d_model is None and any('d_model' in r for r in records):
    values = np.unique(column(records, 'd_model', path))
    if values.size > 1:
      raise ValueError(f'{path}: d_model takes {values.size} values {values[:5].tolist()}; one '
                       'FLOP model needs one width, pass --d-model')
    d_model = float(values[0])
  if d_model is None:
    return None
  k = args.k
  if args.compute == 'sae_sparse' and k is None:
    if not any(args.k_column in r for r in records):
      raise ValueError(f"--compute sae_sparse needs --k or a {args.k_column!r} column in {path}")
    values, counts = np.unique(column(records, args.k_column, path), return_counts=True)
    k = float(values[np.argmax(counts)])  # the most common k
  return laws.ComputeModel(args.compute, d_model=d_model, k=k)


def _inputs(args, law, records, path, flops, compute) -> dict[str, np.ndarray]:
  """The law's inputs from the records, tokens derived from the FLOPs on request."""
  renamed = {'n_latents': args.n_column, 'tokens': args.tokens_column, 'k': args.k_column}
  names = [n for n in law.inputs if not (n == 'tokens' and args.tokens_from_compute)]
  inputs = law_inputs(records, names, path, renamed)
  if 'tokens' in law.inputs and args.tokens_from_compute:
    if flops is None or compute is None:
      raise ValueError('--tokens-from-compute needs a FLOPs column (--compute-column) and a '
                       'FLOP model (--compute lm, or --d-model for the SAE models)')
    inputs['tokens'] = flops / compute.flops_per_token(inputs['n_latents'])
  return inputs


def _options(args) -> fit_lib.FitOptions:
  return fit_lib.FitOptions(
      loss=args.loss, delta=args.delta, reduction=args.reduction, n_starts=args.n_starts or None,
      n_boot=args.n_boot, level=args.level, holdout=args.holdout, seed=args.seed)


def run_fit(args) -> fit_lib.FitResult:
  """Loads, fits, reports, writes the JSON and the plots; returns the result."""
  law = laws.get_law(args.form)
  options = _options(args)  # bad values fail here, before the file is read
  path = args.results
  records, kind = load_records(path)
  n_read = len(records)
  records = select(records, args.where, path)
  y = column(records, args.target, path)
  dropped = 0
  if args.drop_highest:
    if args.drop_highest >= len(records):
      raise ValueError(f'--drop-highest {args.drop_highest} would drop all {len(records)} records')
    keep = np.sort(np.argsort(y, kind='stable')[:len(records) - args.drop_highest])
    records, y, dropped = [records[i] for i in keep], y[keep], args.drop_highest
  compute = _compute_model(args, records, path)
  flops_column = args.compute_column
  if flops_column is None:
    preferred = {'sae': 'flops_dense', 'sae_sparse': 'flops_sparse'}.get(args.compute)
    flops_column = next((c for c in (preferred, 'flops')
                         if c and all(r.get(c) is not None for r in records)), None)
  flops = column(records, flops_column, path) if flops_column else None
  inputs = _inputs(args, law, records, path, flops, compute)
  group_column = args.group_column or default_group_column(records)
  groups = None
  if group_column and group_column != 'none':
    groups = np.array([str(v) for v in column(records, group_column, path, numeric=False)])
  fixed = {'k': args.k} if args.k is not None and 'k' in law.inputs else None
  plan = fit_lib.PlanOptions(compute=compute, budgets=args.budgets, targets=args.targets,
                             fixed=fixed)
  result = fit_lib.fit_law(law, inputs, y, target=args.target, groups=groups, row_compute=flops,
                           options=options, plan=plan)
  header = (f'{path}: {len(records)} {kind} records'
            + (f" (of {n_read}, where {' and '.join(args.where)})" if args.where else '')
            + (f' ({dropped} with the highest {args.target} dropped)' if dropped else '')
            + (f'; bootstrap clustered by {group_column!r}' if groups is not None else '')
            + (f'; FLOPs from {flops_column!r}' if flops_column else ''))
  print(header)
  print(result.report())
  if args.out:
    out = result.to_dict()
    out['input'] = {'path': str(path), 'records': len(records), 'where': args.where,
                    'dropped_highest': dropped, 'target': args.target,
                    'group_column': group_column if groups is not None else None,
                    'columns': {'n_latents': args.n_column}}
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print(f'wrote {args.out}')
  if args.plots:
    from dictlearn.scaling import plot  # pylint: disable=g-import-not-at-top
    for p in plot.plot_all(result, args.plots):
      print(f'wrote {p}')
  return result


def _main(args) -> int:
  run_fit(args)
  return 0


def main(argv=None) -> int:
  """python -m dictlearn.scaling fit RESULTS [flags]; see --help."""
  return cli.run_tool(_main, _parser(), argv)


if __name__ == '__main__':
  sys.exit(main())
