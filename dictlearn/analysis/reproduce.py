"""Runs one of the steer-and-probe reproductions named by its config.

    python -m dictlearn.analysis.reproduce --config experiments/emotion_vectors.py --out DIR

The config's `experiment` field names the reproduction (EXPERIMENTS); its module
does the work (`run(config, model, model_path=, out_dir=) -> results`) and
formats the table (`summary(results)`). The results go to OUT/results.json and
the table to stdout, details to OUT/log.txt; what an experiment saves besides
(concept vectors, the persona axis) goes under OUT too. Tests call
`run(config, out_dir, model=...)` directly.
"""
import json
import logging
import os
import time

from dictlearn import cli
from dictlearn import lm
from dictlearn.analysis import actadd
from dictlearn.analysis import binding
from dictlearn.analysis import emotions
from dictlearn.analysis import feature_steering
from dictlearn.analysis import injection
from dictlearn.analysis import on_policy
from dictlearn.analysis import persona

log = logging.getLogger(__name__)

EXPERIMENTS = {
    'feature_steering': feature_steering,
    'actadd': actadd,
    'injected_concepts': injection,
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
    model: (cfg, params, tokenizer) already loaded from `config.model` ('' =
      SmolLM2-135M-Instruct, a .gguf file or a Hugging Face directory); None loads it.

  Returns:
    The results, with 'experiment' and 'seconds' added.

  Raises:
    ValueError: an unknown experiment name (the message lists the known ones).
  """
  module = EXPERIMENTS.get(config.experiment)
  if module is None:
    raise ValueError(f'config.experiment {config.experiment!r} is not a reproduction; expected '
                     f'one of {sorted(EXPERIMENTS)}.')
  model_path = lm.resolve_model(config.model)
  start = time.time()
  if model is None:
    model = lm.load_model(model_path)
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
  cli.no_arguments(argv)
  print(summary(run(_FLAGS['config'].value, _FLAGS['out'].value)))


_FLAGS = {}  # defined only when run as a command: importing this module defines no flag

if __name__ == '__main__':
  _FLAGS['config'], _FLAGS['out'] = cli.define_flags(
      'out', 'output directory (results.json, vectors, log.txt)', 'reproduction config file[:arg]')
  cli.run_config_command(main, doc=__doc__, log_dir=lambda: _FLAGS['out'].value)
