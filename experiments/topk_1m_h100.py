"""A 1M-latent TopK SAE (k=32) on a Llama-3-8B-sized residual stream, on 8 H100s.

d_model 4096, 1,048,576 latents, batch 8192 tokens, bfloat16 matmuls (float32
parameters and Adam moments). The latents split over the 8 GPUs (mesh (1, 8):
131,072 latents and 12 GiB of parameters and Adam moments each, about 25 GiB
at the step's peak), the batch is replicated.

One host with 8 GPUs, one process:

    python -m dictlearn.train --config experiments/topk_1m_h100.py --workdir /scratch/topk1m \\
      --config.data.store=/scratch/acts/blocks.16.hook_resid_post

SLURM, one process per GPU (JAX reads the job's address, count and rank; arg
'2nodes' for 16 GPUs, mesh (1, 16)):

    srun --nodes=1 --ntasks-per-node=8 --gpus-per-task=1 \\
      python -m dictlearn.train --config experiments/topk_1m_h100.py --workdir /shared/topk1m \\
      --config.data.store=/shared/acts/blocks.16.hook_resid_post

Expected step time: TopK's model FLOPs are 2 d n + 8 d k per token
(`dictlearn.sae.flops`): 70 TFLOP per step; at 40% MFU of 8 x 989 TFLOP/s
(bf16) about 22 ms, 370K tokens/s. Not measured here (no GPU); the compiled
step's memory per GPU is checked by tests/test_accelerator_configs.py.
"""
from experiments import base

TARGETS = {'': ('H100', 8), '2nodes': ('H100', 16)}


def get_config(arg=None):
  """1M TopK on H100s; `arg` '' (one host of 8) or '2nodes' (16)."""
  arg = arg or ''
  if arg not in TARGETS:
    raise ValueError(f'experiments/topk_1m_h100.py: unknown variant {arg!r}; '
                     f'expected one of {sorted(TARGETS)}')
  c = base.get_config()
  c.unlock()
  c.data.store = '/scratch/activations/llama-3-8b/blocks.16.hook_resid_post'
  c.data.d_model = 4096
  c.data.heldout_tokens = 1 << 20
  c.data.shuffle_window_chunks = 64
  c.sae.architecture = 'topk'
  c.sae.n_latents = 1 << 20
  c.sae.k = 32
  c.sae.aux_k = 512
  c.sae.dead_tokens_threshold = 100_000_000
  c.sae.dtype = 'bfloat16'
  c.train.batch_size = 8192
  c.train.num_steps = 1_000_000  # 8.2B tokens
  c.train.log_every = 1000
  c.train.checkpoint_every = 20_000
  c.train.eval_batches = 32
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 1000
  c.mesh.shape = (1, TARGETS[arg][1])
  c.lock()
  return c
