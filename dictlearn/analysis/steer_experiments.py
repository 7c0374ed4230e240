"""Runs the steering reproductions: features that steer, ActAdd, injected concepts.

    python -m dictlearn.analysis.steer_experiments --config experiments/steer_features.py --out DIR

`config.experiment` names the reproduction; its module does the work
(`run(config, model, model_path=, out_dir=) -> results`) and formats the table
(`summary(results)`), the interface of `dictlearn.analysis.reproduce`'s
reproductions. Results go to OUT/results.json, the table to stdout.
"""
import json
import logging
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from dictlearn import harvest
from dictlearn.analysis import actadd
from dictlearn.analysis import feature_steering
from dictlearn.analysis import injection
from dictlearn.config_cli import parse_flags
from dictlearn.lm import gguf as gguf_lib

EXPERIMENTS = {
    'feature_steering': feature_steering,
    'actadd': actadd,
    'injected_concepts': injection,
}


def run(config, out_dir: str, *, model=None) -> dict:
  """Runs the reproduction `config.experiment`; writes OUT/results.json.

  Raises:
    ValueError: an unknown experiment name (the message lists the known ones).
  """
  module = EXPERIMENTS.get(config.experiment)
  if module is None:
    raise ValueError(f'config.experiment {config.experiment!r} is not a steering reproduction; '
                     f'expected one of {sorted(EXPERIMENTS)}.')
  model_path = harvest.resolve_model_path(config.model)
  start = time.time()
  model = model or gguf_lib.load_gguf(model_path)
  os.makedirs(out_dir, exist_ok=True)
  results = module.run(config, model, model_path=model_path, out_dir=out_dir)
  results = {'experiment': config.experiment, 'seconds': round(time.time() - start, 1),
             **results}
  with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, default=float)
  return results


def summary(results: dict) -> str:
  """The table of a finished run's results."""
  return (EXPERIMENTS[results['experiment']].summary(results)
          + f'\n({results["seconds"]:.0f} s)')


_CONFIG = config_flags.DEFINE_config_file('config', None, 'reproduction config file',
                                          lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'output directory (results.json)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax's notes on read-only checkpoints
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)  # "no TPU backend"
  print(summary(run(_CONFIG.value, _OUT.value)))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main, flags_parser=parse_flags)
