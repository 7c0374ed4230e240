"""Scaling Monosemanticity's 1M, 4M and 34M-latent shapes on TPU v5p pod slices.

ReLU/L1 SAEs as Templeton et al. (2024) trained on Claude 3 Sonnet's middle
residual stream (its width is not published: 4096 stands in), batch 4096, the
latent axis sharded over every chip of the slice (mesh (1, N)): arg '1m' on a
v5p-16 (8 chips), '4m' on a v5p-64 (32 chips), '34m' on a v5p-256 (128 chips,
278K latents each: 25.5 GiB of parameters and Adam moments, about 43 GiB at the
step's peak, of a chip's 95 GiB).

A pod slice is several hosts: the same command on every one, JAX finds the others
(`distributed.initialize = 'always'`); the store on gs://, the workdir on the
bucket mounted by gcsfuse on every host (/gcs/BUCKET), so that all see it:

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \\
      'cd dictlearn && python -m dictlearn.train \\
       --config experiments/scaling_monosemanticity.py:34m --workdir /gcs/BUCKET/runs/mono34m \\
       --config.data.store=gs://BUCKET/acts/resid_mid'

Expected step time: 10 d n FLOPs per token (`dictlearn.sae.flops`) x 4096
tokens; at 50% MFU of 459 TFLOP/s per chip: 1M about 96 ms, 4M about 96 ms (4x
the chips), 34M about 0.2 s (0.65 PFLOP per step on 128 chips). Not measured here
(no TPU); tests/test_accelerator_configs.py compiles each for its chip count with
fake CPU devices and checks the memory per chip.
"""
from experiments import base

TARGETS = {'1m': ('TPU v5p', 8), '4m': ('TPU v5p', 32), '34m': ('TPU v5p', 128)}
_LATENTS = {'1m': 1 << 20, '4m': 1 << 22, '34m': 34 * (1 << 20)}


def get_config(arg=None):
  """`arg`: '1m' (default), '4m' or '34m'."""
  arg = arg or '1m'
  if arg not in TARGETS:
    raise ValueError(f'experiments/scaling_monosemanticity.py: unknown variant {arg!r}; '
                     f'expected one of {sorted(TARGETS)}')
  c = base.get_config()
  c.unlock()
  c.data.store = 'gs://YOUR_BUCKET/activations/resid_mid'
  c.data.d_model = 4096
  c.data.heldout_tokens = 1 << 20
  c.data.shuffle_window_chunks = 64
  c.sae.architecture = 'relu_l1'
  c.sae.n_latents = _LATENTS[arg]
  c.sae.sparsity_coefficient = 5.0
  c.sae.sparse_capacity = 0  # dense on the MXU
  c.sae.dead_tokens_threshold = 1_000_000_000
  c.train.batch_size = 4096
  c.train.num_steps = 1_000_000
  c.train.log_every = 1000
  c.train.checkpoint_every = 10_000
  c.train.eval_batches = 32
  c.optim.learning_rate = 5e-5
  c.optim.warmup_steps = 1000
  c.mesh.shape = (1, TARGETS[arg][1])
  c.distributed.initialize = 'always'  # a pod slice is several hosts
  c.lock()
  return c
