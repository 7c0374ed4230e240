"""The main job: harvest activations, train an SAE on them, evaluate it in the model.

    python -m dictlearn.pipeline --config experiments/smollm2_topk.py --workdir runs/smollm2

`workdir/activations/<site>/` holds the store, `workdir/sae/` the training run
(checkpoints, metrics.jsonl, tensorboard/), `workdir/summary.json` the result and
`workdir/log.txt` the details. Each stage resumes: run the same command again
after an interruption and finished work is kept.
"""
import json
import os

import ml_collections

from dictlearn import evals
from dictlearn import harvest as harvest_lib
from dictlearn import lm
from dictlearn import logs
from dictlearn.train import checks
from dictlearn.train import trainer

SUMMARY = 'summary.json'


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Harvests, trains and evaluates; returns the summary (also in workdir/summary.json).

  Paths in the summary are relative to `workdir` (`run`, `store`, `metrics`), so
  the directory can be moved as a whole.
  """
  if len(config.harvest.sites) != 1:
    raise ValueError(f'config.harvest.sites must name one site for the main job, got '
                     f'{tuple(config.harvest.sites)}')
  # Every stage's config, checked before the first one starts.
  harvest_lib.validate_config(config.harvest)
  checks.validate_config(config)
  site = config.harvest.sites[0]
  model = lm.load_model(harvest_lib.resolve_model_path(config.harvest.model))
  activations, sae_dir = os.path.join(workdir, 'activations'), os.path.join(workdir, 'sae')
  logs.stage('1/3 harvesting %s into %s', site, activations)
  harvested = harvest_lib.harvest(config.harvest, activations, model=model)
  train_config = ml_collections.ConfigDict(config.to_dict())
  train_config.data.store = harvested['stores'][site]
  train_config.lock()
  logs.stage('2/3 training a %s SAE of %d latents', config.sae.architecture, config.sae.n_latents)
  trained = trainer.train_and_evaluate(train_config, sae_dir)
  logs.stage('3/3 evaluating in the model (%d held-out contexts)', config.train.ce_contexts)
  evaluation = evals.evaluate_checkpoint(sae_dir, lm_model=model)
  evals.record_evaluation(sae_dir, evaluation['step'], evaluation)
  relative = lambda path: os.path.relpath(path, os.path.abspath(workdir))
  summary = {
      'site': site, 'harvested_tokens': harvested['n_tokens'],
      'store': relative(harvested['stores'][site]),
      'architecture': config.sae.architecture, 'n_latents': config.sae.n_latents,
      'steps': trained['step'], 'train_tokens_per_second': trained['train'].get('tokens_per_second'),
      **{k: evaluation.get(k) for k in ('fvu', 'l0', 'dead_fraction', 'dense_fraction',
                                        'ce_clean', 'ce_spliced', 'ce_zero_ablation',
                                        'ce_loss_recovered', 'kl_spliced')},
      'run': relative(trained['workdir']), 'metrics': relative(trained['metrics']),
  }
  with open(os.path.join(workdir, SUMMARY), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  return summary


def summary_text(summary: dict, workdir: str) -> str:
  """The main job's result, for a person."""
  return '\n'.join([
      f"SAE on {summary['site']} ({summary['harvested_tokens']:,} harvested tokens): "
      f"{summary['architecture']}, {summary['n_latents']} latents, {summary['steps']} steps",
      f"  held-out FVU {summary['fvu']:.4f}   L0 {summary['l0']:.1f}   "
      f"dead {summary['dead_fraction']:.3f}   dense {summary['dense_fraction']:.3f}",
      f"  CE clean {summary['ce_clean']:.4f}  spliced {summary['ce_spliced']:.4f}  "
      f"zero-ablated {summary['ce_zero_ablation']:.4f}  ->  CE loss recovered "
      f"{summary['ce_loss_recovered']:.4f}, KL {summary['kl_spliced']:.4f}",
      f"  outputs: {os.path.abspath(workdir)} ({SUMMARY}, sae/, activations/, log.txt)",
  ])
