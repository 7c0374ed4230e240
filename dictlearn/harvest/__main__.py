"""Harvest: run a language model over a corpus, write hook-site activations to stores.

    python -m dictlearn.harvest --config experiments/harvest_smollm2.py --out DIR [--config.x=y]

One store per site under DIR, and DIR/harvest.json (the record; resumable: run
the same command again after an interruption). Details go to DIR/log.txt.
"""
from dictlearn import cli
from dictlearn import harvest

_CONFIG, _OUT = cli.define_flags('out', 'output directory or kvstore URL',
                                 'harvest config file[:arg]')


def main(argv):
  cli.no_arguments(argv)
  summary = harvest.harvest(_CONFIG.value, _OUT.value)
  print(f"{summary['n_tokens']:,} tokens per site in {summary['out_dir']}: "
        + ', '.join(summary['stores'].values()))


if __name__ == '__main__':
  cli.run_config_command(main, doc=__doc__, log_dir=lambda: _OUT.value)
