"""A scaling sweep: dictionary size x training tokens, each run the ordinary trainer.

    python -m dictlearn.scaling.sweep run --config experiments/scaling_sweep.py --out runs/sweep
    python -m dictlearn.scaling fit runs/sweep/results.jsonl --form chinchilla --target fvu ...

Defaults: TopK SAEs of 256 to 8192 latents on the synthetic experiment's data,
each evaluated at 1/4, 1/2 and all of its 2^20 training tokens. `arg` picks a
preset: 'smollm2' (the same sizes on the main job's SmolLM2 store, with a
constant learning rate so that every evaluation point is a fair token budget:
about 25 minutes on 2 CPU cores) or 'smoke' (three tiny runs, for tests).
"""
import ml_collections


def get_config(arg=None):
  """Sweep config; `arg` = None (default sweep), 'smollm2' or 'smoke'."""
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
  c.ce_contexts = 0  # held-out contexts for CE loss recovered at each point (needs a harvested store)
  c.overrides = ()  # 'dotted.path=value' strings applied to every run, e.g. 'sae.k=16'
  if arg == 'smollm2':  # on the main job's store: run the main job first
    c.experiment = 'experiments/smollm2_topk.py'
    c.overrides = ('data.store=runs/smollm2/activations/blocks.12.hook_resid_post',
                   'train.checkpoint_every=100000', 'optim.decay=constant', 'sae.aux_k=128')
    c.eval_batches = 8
    c.ce_contexts = 4
  elif arg == 'smoke':
    c.experiment = 'experiments/tiny.py'
    c.n_latents = (32, 64, 128)
    c.tokens = (64 * 40,)
    c.eval_fractions = (0.5, 1.0)
    c.eval_batches = 2
  elif arg:
    raise ValueError(f'scaling_sweep preset {arg!r} is unknown; expected none, smollm2 or smoke')
  c.lock()
  return c
