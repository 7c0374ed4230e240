"""The tiny variant the tests run: the synthetic experiment, shrunk to seconds.

    python -m dictlearn.train --config experiments/tiny.py --workdir /tmp/dl_tiny

`arg` names the architecture (default topk). Expected: a few seconds on 2 CPU cores.
"""
from experiments import synthetic


def get_config(arg=None):
  """Tiny run of the synthetic experiment; `arg` picks the architecture."""
  c = synthetic.get_config(arg)
  c.unlock()
  c.data.synthetic.n_true = 64
  c.data.synthetic.d_model = 16
  c.data.synthetic.n_tokens = 16384
  c.data.synthetic.mean_active = 3.0
  c.data.heldout_tokens = 2048
  c.data.shuffle_window_chunks = 4
  c.sae.n_latents = 128
  c.sae.k = 4
  c.sae.aux_k = 16
  c.sae.dead_tokens_threshold = 4096
  c.train.batch_size = 64
  c.train.num_steps = 20
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.eval_batches = 2
  c.optim.warmup_steps = 5
  c.lock()
  return c
