"""python -m dictlearn.train --config experiments/NAME.py --workdir DIR [--config.x=y ...]"""
import json
import logging

from absl import app
from absl import flags
from ml_collections import config_flags

from dictlearn.config_cli import parse_flags
from dictlearn.train.trainer import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics)')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax's per-save chatter
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(summary, indent=2, default=str))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
