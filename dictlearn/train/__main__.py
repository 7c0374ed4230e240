"""Trains an SAE as an experiment config says, resuming from the latest checkpoint.

    python -m dictlearn.train --config experiments/NAME.py[:ARG] --workdir DIR [--config.a.b=v ...]

Checkpoints, metrics.jsonl, tensorboard/ and log.txt go to DIR. Run the same
command again to resume; SIGTERM saves a checkpoint and stops.

Several hosts: run the same command on each (TPU VM `--worker=all`, SLURM `srun`,
or with --config.distributed.coordinator_address/num_processes/process_id); DIR
must be a path they all see. Process 0 prints and writes the metrics; process p
logs to DIR/log.<p>.txt.
"""
from dictlearn import cli
from dictlearn import distributed
from dictlearn.train import trainer

_CONFIG, _WORKDIR = cli.define_flags(
    'workdir', 'run directory (checkpoints, metrics, log.txt)', 'experiment config file[:arg]')


def main(argv):
  cli.no_arguments(argv)
  summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if distributed.is_primary():
    print(trainer.summary_text(summary))


if __name__ == '__main__':
  cli.run_config_command(main, doc=__doc__, log_dir=lambda: _WORKDIR.value)
