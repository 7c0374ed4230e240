"""Sweeps over dictionary size x training tokens (and k, learning rate, seed).

A sweep config (`experiments/scaling_sweep.py`) names a base experiment and the
values to sweep; `expand` turns it into runs of the ordinary trainer, each with
its own workdir under the sweep directory. Then either

    python -m dictlearn.scaling.sweep run --config experiments/scaling_sweep.py --out DIR

trains them here, evaluating each at `eval_fractions` of its training (the
points lie on one learning-rate schedule). Runs that share their data order
(store, seed, batch size: `dictlearn.train.group.data_order`) train together, one
group after another: each batch is read once and every run of the group takes
its step in one jitted function (`dictlearn.train.group`), each with its own
state, checkpoints, metrics and resume. Or

    python -m dictlearn.scaling.sweep commands --config ... --out DIR

prints one `python -m dictlearn.train` command per run for a cluster launcher,
after which `... collect --out DIR` gathers what they recorded. Either way the
results table `DIR/results.jsonl` has one record per (run, evaluation point):

    run, architecture, seed, d_model, n_latents, alive_latents, k,
    sparsity_coefficient, learning_rate, batch_size, step, tokens,
    flops_dense, flops_sparse (by `laws.sae_training_flops`), fvu, mse, l0,
    dead_fraction, dense_fraction, ce_loss_recovered (when the run has one)
"""
import ast
import dataclasses
import itertools
import json
import os
import runpy
import shlex

import ml_collections

from dictlearn import cli
from dictlearn import evals
from dictlearn import harvest
from dictlearn import lm
from dictlearn import logs
from dictlearn.data import store as store_lib
from dictlearn.scaling import laws
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import group as group_lib
from dictlearn.train import metrics as metrics_lib

RESULTS = 'results.jsonl'


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""
  name: str
  overrides: dict  # dotted config path -> value

  def workdir(self, out_dir: str) -> str:
    return os.path.join(out_dir, self.name)


def experiment_path(path: str) -> str:
  """An experiment file named in a sweep config: as given (from the current
  directory), else relative to the folder that holds `experiments/`."""
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  shipped = os.path.join(os.path.dirname(cli.EXPERIMENTS_DIR), path)
  if os.path.exists(shipped):
    return shipped
  raise FileNotFoundError(f'experiment file {path} does not exist (looked in the current '
                          f'directory and in {os.path.dirname(cli.EXPERIMENTS_DIR)})')


def load_experiment(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads `get_config(arg)` from an experiment file (see `experiment_path`)."""
  path = experiment_path(path)
  cli.make_config_importable(path)
  return runpy.run_path(path)['get_config'](arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict):
  """A copy of `config` with dotted-path overrides; an unknown path is an error."""
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    node, parts = config, dotted.split('.')
    for i, part in enumerate(parts):
      if part not in node:
        raise KeyError(f'sweep override {dotted}={value!r}: config.'
                       f'{".".join(parts[:i]) or "(top)"} has no field {part!r}')
      if i < len(parts) - 1:
        node = node[part]
    node[parts[-1]] = type(node[parts[-1]])(value)
  config.lock()
  return config


def parse_overrides(items) -> dict:
  """('a.b=1', 'c=x') -> {'a.b': 1, 'c': 'x'}; values parsed as Python literals when they are."""
  out = {}
  for item in items:
    path, sep, text = item.partition('=')
    if not sep or not path:
      raise ValueError(f'sweep override {item!r} is not of the form dotted.path=value')
    try:
      out[path] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[path] = text
  return out


def _absolute_store(overrides: dict) -> dict:
  """A local `data.store` given relative to the current directory, made absolute, so
  that every run records where it is whatever directory it later runs from."""
  store = overrides.get('data.store')
  if isinstance(store, str) and store and '://' not in store:
    overrides['data.store'] = os.path.abspath(store)
  return overrides


def _short(tokens: int) -> str:
  for unit, size in (('G', 2**30), ('M', 2**20), ('K', 2**10)):
    if tokens >= size and tokens % size == 0:
      return f'{tokens // size}{unit}'
  return str(tokens)


def expand(sweep: ml_collections.ConfigDict) -> list[Run]:
  """The runs of a sweep: the product of its value lists (empty list = the experiment's)."""
  base = load_experiment(sweep.experiment, sweep.experiment_arg)
  axes = [('n_latents', 'sae.n_latents', tuple(sweep.n_latents)),
          ('tokens', None, tuple(sweep.tokens)),
          ('k', 'sae.k', tuple(sweep.k)),
          ('lr', 'optim.learning_rate', tuple(sweep.learning_rate)),
          ('seed', 'seed', tuple(sweep.seeds))]
  if not sweep.n_latents or not sweep.tokens:
    raise ValueError('a sweep needs at least one n_latents and one tokens value')
  runs = []
  for values in itertools.product(*(vals or (None,) for _, _, vals in axes)):
    overrides, parts = _absolute_store(parse_overrides(sweep.overrides)), []
    for (label, path, _), value in zip(axes, values):
      if value is None:
        continue
      if label == 'tokens':
        steps = int(value) // base.train.batch_size
        if steps < 1:
          raise ValueError(f'tokens={value} is less than one batch ({base.train.batch_size})')
        overrides['train.num_steps'] = steps
        parts.append(f'D{_short(int(value))}')
      else:
        overrides[path] = value
        parts.append(f'{label}{value}')
    runs.append(Run('_'.join(parts), overrides))
  return runs


def run_config(sweep: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  return apply_overrides(load_experiment(sweep.experiment, sweep.experiment_arg), run.overrides)


def eval_steps(num_steps: int, fractions) -> list[int]:
  """Steps at which a run of `num_steps` is evaluated (always including the last)."""
  steps = {max(1, round(f * num_steps)) for f in fractions if 0 < f <= 1}
  return sorted(steps | {num_steps})


def records_of(run: Run, config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Results-table records from the held-out evaluations a run wrote to its metrics."""
  evaluations = metrics_lib.read_metrics(workdir, 'eval')
  if not evaluations:
    return []
  _, _, run_info = ckpt_lib.read_metadata(ckpt_lib.checkpoint_dir(workdir))
  d_model = int(run_info['d_model'])
  out = []
  for record in evaluations:
    n = config.sae.n_latents
    tokens = record['step'] * config.train.batch_size
    topk = config.sae.architecture in ('topk', 'batchtopk')
    k_eff = config.sae.k if topk else max(record['l0'], 1e-9)
    out.append({
        'run': run.name, 'architecture': config.sae.architecture, 'seed': config.seed,
        'd_model': d_model, 'n_latents': n,
        'alive_latents': round(n * (1 - record['dead_fraction'])),
        'k': config.sae.k if topk else None,
        'sparsity_coefficient': None if topk else config.sae.sparsity_coefficient,
        'learning_rate': config.optim.learning_rate, 'batch_size': config.train.batch_size,
        'step': record['step'], 'tokens': tokens,
        'flops_dense': float(laws.sae_training_flops(n, tokens, d_model)),
        'flops_sparse': float(laws.sae_training_flops(n, tokens, d_model, k=k_eff,
                                                      sparse_decode=True)),
        **{m: record.get(m) for m in ('fvu', 'mse', 'l0', 'dead_fraction', 'dense_fraction',
                                      'ce_loss_recovered')},
    })
  return out


def collect(sweep: ml_collections.ConfigDict, out_dir: str) -> list[dict]:
  """Rebuilds `out_dir/results.jsonl` from every run's recorded evaluations."""
  records = []
  for run in expand(sweep):
    workdir = run.workdir(out_dir)
    if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
      records.extend(records_of(run, run_config(sweep, run), workdir))
  path = os.path.join(out_dir, RESULTS)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
  os.replace(tmp, path)
  return records


def group_runs(runs: list[Run], configs: dict) -> list[list[Run]]:
  """The runs in groups that share their data order, in the order they first appear."""
  groups = {}
  for run in runs:
    groups.setdefault(group_lib.data_order(configs[run.name]), []).append(run)
  return list(groups.values())


def _evaluated(sweep: ml_collections.ConfigDict):
  """eval_done(workdir, step) for the sweep: recorded, with CE when the sweep wants it."""

  def done(workdir: str, step: int) -> bool:
    return any(r['step'] == step and (sweep.ce_contexts == 0 or 'ce_loss_recovered' in r)
               for r in metrics_lib.read_metrics(workdir, 'eval'))

  return done


def run_sweep(sweep: ml_collections.ConfigDict, out_dir: str) -> list[dict]:
  """Trains every run here, a group of runs sharing their data order at a time,
  evaluating along the way; resumable."""
  os.makedirs(out_dir, exist_ok=True)
  runs = expand(sweep)
  configs = {}
  for run in runs:
    config = run_config(sweep, run)
    config.unlock()
    config.train.eval_batches = sweep.eval_batches
    config.lock()
    configs[run.name] = config
  done = _evaluated(sweep)
  todo = [run for run in runs if not all(
      done(run.workdir(out_dir), step)
      for step in eval_steps(configs[run.name].train.num_steps, sweep.eval_fractions))]
  lm_model = None
  if sweep.ce_contexts > 0 and todo:
    lm_model = _harvested_model(configs[todo[0].name])

  def add_ce(member, step):  # the model's own loss with the SAE spliced in
    ce = evals.evaluate_checkpoint(member.workdir, step, eval_batches=0,
                                   ce_contexts=sweep.ce_contexts, lm_model=lm_model)
    evals.record_evaluation(member.workdir, step, ce)

  groups = group_runs(todo, configs)
  for i, group in enumerate(groups):
    logs.stage('sweep group %d/%d: %d runs on one read of the data (%s)', i + 1, len(groups),
               len(group), ', '.join(run.name for run in group))
    group_lib.train_group(
        [configs[run.name] for run in group], [run.workdir(out_dir) for run in group],
        eval_steps=[eval_steps(configs[run.name].train.num_steps, sweep.eval_fractions)
                    for run in group],
        after_eval=add_ce if sweep.ce_contexts > 0 else None, eval_done=done)
    collect(sweep, out_dir)
  return collect(sweep, out_dir)


def _harvested_model(config: ml_collections.ConfigDict):
  """The language model the runs' store was harvested from (loaded once), or None."""
  if not config.data.store:
    return None
  manifest, _ = store_lib.read_status(config.data.store)
  path = harvest.harvested_model_path(manifest)
  return None if path is None else lm.load_model(path)  # None: no model, no CE to recover


def commands(sweep: ml_collections.ConfigDict, out_dir: str) -> list[str]:
  """One trainer command per run, for a cluster launcher."""
  target = experiment_path(sweep.experiment) + (
      f':{sweep.experiment_arg}' if sweep.experiment_arg else '')
  out = []
  for run in expand(sweep):
    args = ['python', '-m', 'dictlearn.train', '--config', target,
            '--workdir', os.path.abspath(run.workdir(out_dir)),
            f'--config.train.eval_batches={sweep.eval_batches}']
    args += [f'--config.{k}={v}' for k, v in run.overrides.items()]
    out.append(shlex.join(args))
  return out
