"""A scaling sweep: dictionary size x training tokens, each run the ordinary trainer.

    python -m dictlearn.scaling.sweep run --config experiments/scaling_sweep.py --out runs/sweep
    python -m dictlearn.scaling fit runs/sweep/results.jsonl --form chinchilla --target fvu ...

Defaults: TopK SAEs of 256 to 8192 latents on the synthetic experiment's data,
each evaluated at 1/4, 1/2 and all of its 2^20 training tokens. `arg` picks a
preset: 'smoke' (three tiny runs, for tests).
"""
import ml_collections


def get_config(arg=None):
  """Sweep config; `arg` = None (default sweep) or 'smoke'."""
  c = ml_collections.ConfigDict()
  c.experiment = 'experiments/synthetic.py'  # base experiment file of every run
  c.experiment_arg = ''  # its get_config argument ('' = none)
  c.n_latents = (256, 512, 1024, 2048, 4096, 8192)  # dictionary sizes
  c.tokens = (2 ** 20,)  # training tokens per run (num_steps = tokens // batch_size)
  c.k = ()  # k values to sweep; empty = the experiment's
  c.learning_rate = ()  # learning rates to sweep; empty = the experiment's
  c.seeds = (0,)  # seeds; several give the bootstrap clusters
  c.eval_fractions = (0.25, 0.5, 1.0)  # evaluation points along each run, as fractions of it
  c.eval_batches = 8  # held-out batches per evaluation
  c.overrides = ()  # 'dotted.path=value' strings applied to every run, e.g. 'sae.k=16'
  if arg == 'smoke':
    c.experiment = 'experiments/tiny.py'
    c.n_latents = (32, 64, 128)
    c.tokens = (64 * 40,)
    c.eval_fractions = (0.5, 1.0)
    c.eval_batches = 2
  elif arg:
    raise ValueError(f'scaling_sweep preset {arg!r} is unknown; expected none or smoke')
  c.lock()
  return c
