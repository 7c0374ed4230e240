"""The main job: harvest activations, train an SAE on them, evaluate it in the model.

    python -m dictlearn.pipeline --config experiments/smollm2_topk.py --workdir runs/smollm2

`workdir/activations/<site>/` holds the store, `workdir/sae/` the training run
(checkpoints, metrics.jsonl, tensorboard/). Each stage resumes: run the same
command again after an interruption and finished work is kept.
"""
import json
import logging
import os

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from dictlearn import evals
from dictlearn import harvest as harvest_lib
from dictlearn import lm
from dictlearn.config_cli import parse_flags
from dictlearn.train.trainer import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/smollm2_topk.py',
                                          'main-job config (harvest section + trainer fields)',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/smollm2', 'output directory')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Harvests, trains and evaluates; returns the summary."""
  if len(config.harvest.sites) != 1:
    raise ValueError(f'config.harvest.sites must name one site for the main job, got '
                     f'{tuple(config.harvest.sites)}')
  site = config.harvest.sites[0]
  model = lm.load_gguf(harvest_lib.resolve_model_path(config.harvest.model))
  logging.info('1/3 harvesting %s into %s', site, os.path.join(workdir, 'activations'))
  harvested = harvest_lib.harvest(config.harvest, os.path.join(workdir, 'activations'),
                                  model=model)
  train_config = ml_collections.ConfigDict(config.to_dict())
  train_config.data.store = harvested['stores'][site]
  train_config.lock()
  logging.info('2/3 training a %s SAE of %d latents', config.sae.architecture, config.sae.n_latents)
  trained = train_and_evaluate(train_config, os.path.join(workdir, 'sae'))
  logging.info('3/3 evaluating in the model (%d held-out contexts)', config.ce_contexts)
  evaluation = evals.evaluate_checkpoint(os.path.join(workdir, 'sae'),
                                         ce_contexts=config.ce_contexts, lm_model=model)
  summary = {
      'site': site, 'harvested_tokens': harvested['n_tokens'], 'store': harvested['stores'][site],
      'architecture': config.sae.architecture, 'n_latents': config.sae.n_latents,
      'steps': trained['step'], 'train_tokens_per_second': trained['train'].get('tokens_per_second'),
      **{k: evaluation.get(k) for k in ('fvu', 'l0', 'dead_fraction', 'dense_fraction',
                                        'ce_clean', 'ce_spliced', 'ce_zero_ablation',
                                        'ce_loss_recovered', 'kl_spliced')},
      'run': trained['workdir'], 'metrics': trained['metrics'],
  }
  with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger('absl').setLevel(logging.ERROR)
  summary = run(_CONFIG.value, _WORKDIR.value)
  print('\n'.join([
      f"SAE on {summary['site']} ({summary['harvested_tokens']:,} harvested tokens): "
      f"{summary['architecture']}, {summary['n_latents']} latents, {summary['steps']} steps",
      f"  held-out FVU {summary['fvu']:.4f}   L0 {summary['l0']:.1f}   "
      f"dead {summary['dead_fraction']:.3f}   dense {summary['dense_fraction']:.3f}",
      f"  CE clean {summary['ce_clean']:.4f}  spliced {summary['ce_spliced']:.4f}  "
      f"zero-ablated {summary['ce_zero_ablation']:.4f}  ->  CE loss recovered "
      f"{summary['ce_loss_recovered']:.4f}, KL {summary['kl_spliced']:.4f}",
      f"  outputs: {os.path.abspath(_WORKDIR.value)} (summary.json, sae/, activations/)",
  ]))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
