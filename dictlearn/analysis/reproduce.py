"""Runs one of the steer-and-probe reproductions named by its config.

    python -m dictlearn.analysis.reproduce --config experiments/emotion_vectors.py --out DIR

The config's `experiment` field names the reproduction (EXPERIMENTS); its module
does the work (`run(config, model, model_path=, out_dir=) -> results`) and
formats the table (`summary(results)`). The results go to OUT/results.json and
the table to stdout; what an experiment saves besides (concept vectors) goes
under OUT too. Tests call `run(config, out_dir, model=...)` directly.
"""
import json
import logging
import os
import time

from dictlearn import harvest
from dictlearn.analysis import binding
from dictlearn.analysis import emotions
from dictlearn.analysis import on_policy
from dictlearn.analysis import persona
from dictlearn.lm import gguf as gguf_lib

log = logging.getLogger(__name__)

EXPERIMENTS = {
    'emotion_vectors': emotions,
    'persona_axis': persona,
    'on_policy': on_policy,
    'entity_binding': binding,
}


def run(config, out_dir: str, *, model=None) -> dict:
  """Runs the reproduction `config.experiment`; writes OUT/results.json.

  Args:
    config: an experiments/<name>.py config.
    out_dir: output directory (created).
    model: (cfg, params, tokenizer) already loaded from `config.model`; None loads it.

  Returns:
    The results, with 'experiment' and 'seconds' added.

  Raises:
    ValueError: an unknown experiment name (the message lists the known ones).
  """
  module = EXPERIMENTS.get(config.experiment)
  if module is None:
    raise ValueError(f'config.experiment {config.experiment!r} is not a reproduction; expected '
                     f'one of {sorted(EXPERIMENTS)}.')
  model_path = harvest.resolve_model_path(config.model)
  start = time.time()
  if model is None:
    model = gguf_lib.load_gguf(model_path)
  os.makedirs(out_dir, exist_ok=True)
  results = module.run(config, model, model_path=model_path, out_dir=out_dir)
  results = {'experiment': config.experiment, 'seconds': round(time.time() - start, 1),
             **results}
  with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, default=float)
  return results


def summary(results: dict) -> str:
  """The table of a finished run's results."""
  return (EXPERIMENTS[results['experiment']].summary(results) +
          f'\n({results["seconds"]:.0f} s)')


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  results = run(_FLAGS['config'].value, _FLAGS['out'].value)
  print(summary(results))


_FLAGS = {}

if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from dictlearn.config_cli import parse_flags  # pylint: disable=g-import-not-at-top
  _FLAGS['config'] = config_flags.DEFINE_config_file('config', None, 'reproduction config file',
                                                     lock_config=True)
  _FLAGS['out'] = flags.DEFINE_string('out', None, 'output directory (results.json, vectors)')
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main, flags_parser=parse_flags)
