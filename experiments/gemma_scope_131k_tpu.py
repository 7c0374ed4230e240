"""Gemma Scope's 131K-latent JumpReLU shape on a TPU v3-8 (or v4-8), the latent axis sharded.

The residual stream of Gemma 2 2B (d_model 2304) into 131,072 JumpReLU latents,
batch 4096 as Gemma Scope trained it (Lieberum et al. 2024, TPU v3 in a 4x2
configuration). The latents split over every TPU core (mesh (1, 8) on a v3-8:
each core holds 16,384 latents, 0.84 GiB with their Adam moments, about 2.2 GiB
at the step's peak of its 16 GiB; the batch is replicated,
so no gradient of a weight is ever all-reduced), and the dense encoder runs on the
MXU (`sae.sparse_capacity = 0`).

One TPU VM host (v3-8 and v4-8 are single hosts): harvest the store to gs://
first, mount the bucket for the workdir (gcsfuse at /gcs/BUCKET: checkpoints,
metrics and TensorBoard are files), then, from your machine,

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \\
      'cd dictlearn && python -m dictlearn.train --config experiments/gemma_scope_131k_tpu.py \\
       --workdir /gcs/BUCKET/runs/gemma131k --config.data.store=gs://BUCKET/acts/blocks.12'

(`--worker=all` runs the same command on every host of a bigger slice too, where
`--config.distributed.initialize=always` lets JAX find the other hosts.)
Arg 'v4-8' targets a v4-8 (4 chips, mesh (1, 4)).

Expected step time: 10 d n FLOPs per token (`dictlearn.sae.flops`) x 4096 tokens
= 12.4 TFLOP per step; at 50% MFU of a v3-8's 492 TFLOP/s about 50 ms (Gemma
Scope's published figure for this shape: 45 ms/step, 50.8% MFU); a v4-8 (1.1
PFLOP/s) about 23 ms. Not measured here (no TPU); the compiled step's memory per
core is checked against the core's memory by tests/test_accelerator_configs.py.
"""
from experiments import base

# What tests/test_accelerator_configs.py compiles each variant for: the device
# kind (a key of dictlearn.train.throughput.DEVICES) and how many devices.
TARGETS = {'v3-8': ('TPU v3', 8), 'v4-8': ('TPU v4', 4)}


def get_config(arg=None):
  """Gemma Scope 131K JumpReLU; `arg` 'v3-8' (default) or 'v4-8'."""
  arg = arg or 'v3-8'
  if arg not in TARGETS:
    raise ValueError(f'experiments/gemma_scope_131k_tpu.py: unknown variant {arg!r}; '
                     f'expected one of {sorted(TARGETS)}')
  c = base.get_config()
  c.unlock()
  c.data.store = 'gs://YOUR_BUCKET/activations/gemma-2-2b/blocks.12.hook_resid_post'
  c.data.d_model = 2304
  c.data.heldout_tokens = 1 << 20
  c.data.shuffle_window_chunks = 64
  c.sae.architecture = 'jumprelu'
  c.sae.n_latents = 131072
  c.sae.sparsity_coefficient = 1.0
  c.sae.sparse_capacity = 0  # dense on the MXU; gathers are slow on a TPU
  c.sae.dead_tokens_threshold = 100_000_000
  c.train.batch_size = 4096
  c.train.num_steps = 2_000_000  # 8.2B tokens, as Gemma Scope's mid-width SAEs
  c.train.log_every = 1000
  c.train.checkpoint_every = 20_000
  c.train.eval_batches = 64
  c.optim.learning_rate = 7e-5
  c.optim.warmup_steps = 1000
  c.optim.decay = 'cosine'
  c.mesh.shape = (1, TARGETS[arg][1])
  c.lock()
  return c
