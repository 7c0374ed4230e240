"""Inspect a training run's checkpoint.

    python tools/inspect_checkpoint.py --workdir DIR [--step N]

Prints the step, the config, parameter shapes, dtypes and the shardings they
were saved with, decoder-norm statistics, the dead fraction by the run's own
threshold, and the last metrics recorded. Reads through
`dictlearn.train.checkpoint`; no second copy of the format.
"""
import json
import math
import os
import sys

import jax
import numpy as np

from dictlearn import cli
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import metrics as metrics_lib


def describe(workdir: str, step: int | None = None) -> dict:
  """Everything the tool prints, as a dict."""
  workdir = ckpt_lib.run_directory(workdir)
  directory = ckpt_lib.checkpoint_dir(workdir)
  step, config, run = ckpt_lib.read_metadata(directory, step)
  shardings = ckpt_lib.saved_shardings(directory, step)
  _, state = ckpt_lib.restore_arrays(directory, step)
  params = state['params']
  parameters = {}
  for name, value in sorted(params.items()):
    parameters[name] = {'shape': list(np.shape(value)), 'dtype': str(np.asarray(value).dtype),
                        'sharding': shardings.get(name, 'unknown')}
  w_dec = np.asarray(params['W_dec'], np.float32)
  norms = np.linalg.norm(w_dec, axis=1)
  dead_steps = max(1, math.ceil(config['sae']['dead_tokens_threshold']
                                / config['train']['batch_size']))
  since = np.asarray(state['stats']['steps_since_fired'])
  train_records = metrics_lib.read_metrics(workdir, 'train')
  eval_records = metrics_lib.read_metrics(workdir, 'eval')
  return {
      'workdir': os.path.abspath(workdir),
      'step': step,
      'architecture': config['sae']['architecture'],
      'run': run,
      'parameters': parameters,
      'decoder_norms': {'mean': float(norms.mean()), 'std': float(norms.std()),
                        'min': float(norms.min()), 'max': float(norms.max())},
      'dead_fraction': float(np.mean(since >= dead_steps)),
      'dead_after_steps': dead_steps,
      'last_train_metrics': train_records[-1] if train_records else None,
      'last_eval_metrics': eval_records[-1] if eval_records else None,
      'config': config,
  }


def _main(args) -> int:
  info = describe(args.workdir, args.step)
  if args.json:
    print(json.dumps(info, indent=2, default=str))
    return 0
  print(f"run        {info['workdir']}")
  print(f"step       {info['step']}   architecture {info['architecture']}")
  print(f"data       {info['run']['store']}  d_model {info['run']['d_model']}  "
        f"scale {info['run']['data_scale']:.5g}")
  print('parameters')
  for name, p in info['parameters'].items():
    print(f"  {name:14s} {str(p['shape']):18s} {p['dtype']:9s} {p['sharding']}")
  d = info['decoder_norms']
  print(f"decoder row norms  mean {d['mean']:.4f}  std {d['std']:.4f}  "
        f"min {d['min']:.4f}  max {d['max']:.4f}")
  print(f"dead fraction      {info['dead_fraction']:.4f} "
        f"(unfired for >= {info['dead_after_steps']} steps)")
  for label in ('last_train_metrics', 'last_eval_metrics'):
    if info[label]:
      shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in info[label].items()}
      print(f'{label.replace("_", " ")}  {json.dumps(shown)}')
  print('config')
  print('  ' + json.dumps(info['config'], indent=2).replace('\n', '\n  '))
  return 0


def main(argv=None) -> int:
  parser = cli.ArgumentParser(prog='python tools/inspect_checkpoint.py', description=__doc__)
  parser.add_argument('--workdir', required=True,
                      help="run directory (or a pipeline's directory: its run is sae/)")
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  return cli.run_tool(_main, parser, argv)


if __name__ == '__main__':
  sys.exit(main())
