"""The main job: harvest activations, train an SAE on them, evaluate it in the model.

    python -m dictlearn.pipeline --config experiments/smollm2_topk.py --workdir runs/smollm2

`workdir/activations/<site>/` holds the store, `workdir/sae/` the training run,
`workdir/summary.json` the result and `workdir/log.txt` the details. Run the same
command again after an interruption: finished work is kept.
"""
from dictlearn import cli
from dictlearn import pipeline

_CONFIG, _WORKDIR = cli.define_flags(
    'workdir', 'output directory', 'main-job config (harvest section + trainer fields)')


def main(argv):
  cli.no_arguments(argv)
  summary = pipeline.run(_CONFIG.value, _WORKDIR.value)
  print(pipeline.summary_text(summary, _WORKDIR.value))


if __name__ == '__main__':
  cli.run_config_command(main, doc=__doc__, log_dir=lambda: _WORKDIR.value)
