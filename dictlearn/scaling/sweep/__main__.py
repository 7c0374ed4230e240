"""Run, print or collect a scaling sweep (dictionary size x training tokens).

    python -m dictlearn.scaling.sweep run --config experiments/scaling_sweep.py[:PRESET] --out DIR
    python -m dictlearn.scaling.sweep commands --config ... --out DIR   # one trainer command per run
    python -m dictlearn.scaling.sweep collect --config ... --out DIR    # rebuild DIR/results.jsonl

`run` trains the runs here, evaluating each along its training; runs that share
their data order (store, seed, batch size) train together on one read of every
batch, each with its own checkpoints and metrics. It resumes where it stopped.
Details go to DIR/log.txt.
"""
import os

from dictlearn import cli
from dictlearn.scaling import sweep

_CONFIG, _OUT = cli.define_flags('out', 'sweep directory', 'sweep config file[:preset]')
ACTIONS = ('run', 'commands', 'collect')


def main(argv):
  if len(argv) != 2 or argv[1] not in ACTIONS:
    raise cli.UsageError(f'expected one action, {" | ".join(ACTIONS)}; got {argv[1:]}')
  action, config, out = argv[1], _CONFIG.value, _OUT.value
  if action == 'commands':
    print('\n'.join(sweep.commands(config, out)))
    return
  records = sweep.run_sweep(config, out) if action == 'run' else sweep.collect(config, out)
  print(f'{len(records)} records in {os.path.join(os.path.abspath(out), sweep.RESULTS)}')


if __name__ == '__main__':
  cli.run_config_command(main, doc=__doc__, log_dir=lambda: _OUT.value)
