"""The main job: SmolLM2-135M-Instruct's residual stream -> a TopK SAE -> evaluation.

    python -m dictlearn.pipeline --config experiments/smollm2_topk.py --workdir runs/smollm2

Harvests `blocks.12.hook_resid_post` over the built-in corpus (the Python
documentation in `pydoc_data`, about 110K tokens; no network), trains a TopK SAE
of 4096 latents with k=32 on it, evaluates it on the held-out rows and with the
SAE spliced into the model (CE loss recovered), and prints a summary.

Hardware: 2 CPU cores. The `harvest` section is a harvest config
(experiments/harvest_smollm2.py); everything else is the trainer's (experiments/base.py).
`arg` 'tiny' shrinks it to what the tests run.
"""
from experiments import base
from experiments import harvest_smollm2


def get_config(arg=None):
  """Main-job config; `arg` 'tiny' for the test variant."""
  c = base.get_config()
  c.unlock()
  c.harvest = harvest_smollm2.get_config('tiny' if arg == 'tiny' else None)  # what to harvest (one site)
  c.harvest.unlock()
  del c.harvest['distributed']  # one `distributed` section (the trainer's) serves both stages
  c.harvest.corpus = 'builtin'
  c.harvest.sites = ('blocks.12.hook_resid_post',)
  c.data.heldout_tokens = 8192
  c.sae.architecture = 'topk'
  c.sae.n_latents = 4096
  c.sae.k = 32
  c.sae.aux_k = 512
  c.sae.dead_tokens_threshold = 200_000
  c.train.batch_size = 1024
  c.train.num_steps = 800
  c.train.log_every = 25
  c.train.checkpoint_every = 200
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 50
  if arg == 'tiny':
    c.harvest.sites = ('blocks.1.hook_resid_post',)
    c.harvest.token_budget = 3000
    c.train.ce_contexts = 2
    c.data.heldout_tokens = 512
    c.sae.n_latents, c.sae.k, c.sae.aux_k = 256, 8, 32
    c.train.batch_size, c.train.num_steps, c.train.log_every = 128, 30, 10
    c.train.checkpoint_every, c.train.eval_batches = 30, 2
  elif arg not in (None, ''):
    raise ValueError(f'experiments/smollm2_topk.py: unknown variant {arg!r}; expected none or tiny')
  c.lock()
  return c
