"""Base config: every field dictlearn's trainer reads, each with a one-line comment.

Experiments import this module, call `get_config()` and override what they change.
The library never invents a default: a field missing here is an error there.

    python -m dictlearn.train --config experiments/base.py --workdir /tmp/dl_base
"""
import ml_collections


def get_config(arg=None):
  """Returns the base config (locked). `arg` is unused here."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # master seed: parameters, data order and sampling all derive from it

  # ---- data ----------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.store = ''  # activation store path or kvstore URL; '' = generate synthetic data in workdir/data
  c.data.d_model = -1  # expected activation width; -1 = take it from the store's manifest
  c.data.normalize = True  # scale rows so that the mean squared norm is d_model (factor kept with the run)
  c.data.shuffle_window_chunks = 16  # chunks mixed in one shuffle window (bigger = better mixing, more memory)
  c.data.prefetch = 4  # batches read ahead on a background thread
  c.data.heldout_tokens = 8192  # rows at the end of the store kept out of training, used for evaluation
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.n_true = 512  # true dictionary directions (features in superposition)
  c.data.synthetic.d_model = 64  # activation width
  c.data.synthetic.n_tokens = 262144  # rows generated
  c.data.synthetic.mean_active = 8.0  # mean number of true features active per row
  c.data.synthetic.power_law_exponent = 0.5  # firing frequency of feature i ~ (i + 1) ** -exponent
  c.data.synthetic.noise_std = 0.0  # std of isotropic Gaussian noise added to every row
  c.data.synthetic.seed = 1234  # seed of the true dictionary and the coefficients
  c.data.synthetic.recovered_cosine = 0.9  # a true direction counts as recovered when a decoder row has this cosine with it

  # ---- SAE -----------------------------------------------------------------
  c.sae = ml_collections.ConfigDict()
  c.sae.architecture = 'topk'  # one of relu_l1, topk, batchtopk, jumprelu
  c.sae.n_latents = 4096  # dictionary size
  c.sae.k = 32  # active latents per token (topk, batchtopk: k * batch across the batch)
  c.sae.aux_k = 256  # dead latents used by the AuxK loss (topk, batchtopk, jumprelu's gemma_scope_auxk); 0 disables it
  c.sae.aux_k_coefficient = 1.0 / 32  # weight of the AuxK loss (OpenAI: 1/32)
  c.sae.dead_tokens_threshold = 10_000_000  # a latent unfired for this many tokens counts as dead
  c.sae.dense_threshold = 0.1  # a latent firing on more than this fraction of tokens counts as dense
  c.sae.sparsity_coefficient = 5.0  # final L1 (relu_l1) or L0 (jumprelu) penalty coefficient
  c.sae.sparsity_warmup_fraction = 0.05  # fraction of training over which the penalty rises linearly from 0
  # 'gemma_scope': Lieberum et al. 2024 as published (L0 penalty with straight-through
  # thresholds, unit decoder rows); 'gemma_scope_auxk': the same plus Gao et al.'s AuxK on
  # dead latents (aux_k, aux_k_coefficient, dead_tokens_threshold). See dictlearn/sae/jumprelu.py.
  c.sae.jumprelu_recipe = 'gemma_scope'
  c.sae.jumprelu_threshold_init = 0.001  # initial JumpReLU threshold
  c.sae.jumprelu_bandwidth = 0.001  # width of the rectangle kernel of the threshold pseudo-derivative
  c.sae.batchtopk_threshold_momentum = 0.99  # EMA momentum of the inference threshold learned by batchtopk
  c.sae.decoder_init_norm = 0.1  # initial decoder row norm of relu_l1 (the others keep unit rows)
  c.sae.encoder_block_size = 0  # latents per encoder block with a running top-k merge; 0 = one block
  c.sae.sparse_capacity = 0  # relu_l1/jumprelu: slots per token, on average over groups of 64 tokens, for the non-zeros followed sparsely (0 = dense; more falls back to dense); batchtopk: candidates per token (>= k; 0 = exact batch search)
  c.sae.b_dec_init_rows = 16384  # training rows sampled for b_dec's initial value (their geometric median)
  c.sae.dtype = 'float32'  # compute dtype of the SAE forward pass
  c.sae.param_dtype = 'float32'  # storage dtype of the parameters

  # ---- optimisation --------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 4e-4  # peak Adam learning rate
  c.optim.warmup_steps = 100  # linear learning-rate warmup from 0
  c.optim.decay = 'linear'  # decay after warmup: linear, cosine or constant
  c.optim.decay_start_fraction = 0.8  # fraction of training after which the learning rate decays (linear, cosine)
  c.optim.final_lr_fraction = 0.0  # learning rate at the end, as a fraction of the peak
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.999  # Adam beta2
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.grad_clip_norm = 1.0  # global gradient-norm clip; 0 disables it
  c.optim.state_dtype = 'float32'  # dtype of Adam's moments (bfloat16 halves optimizer memory)

  # ---- training loop -------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4096  # global tokens per step
  c.train.num_steps = 2000  # optimisation steps
  c.train.log_every = 50  # steps between metric records
  c.train.checkpoint_every = 500  # steps between checkpoints
  c.train.keep_checkpoints = 3  # checkpoints kept (older ones deleted)
  c.train.eval_batches = 4  # held-out batches evaluated at the end of training (0 = skip)
  c.train.ce_contexts = 16  # held-out contexts for CE loss recovered (dictlearn.evals, the pipeline; harvested stores only; 0 = skip)
  c.train.init_from = ''  # checkpoint directory to start from when the workdir has none

  # ---- sharding ------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)  # ('data', 'model') mesh shape; -1 takes the remaining devices
  c.mesh.axis_names = ('data', 'model')  # mesh axis names
  c.mesh.logical_axis_rules = (('batch', 'data'), ('latent', 'model'), ('embed', None))  # logical -> mesh axis

  c.distributed = distributed_config()  # processes of a multi-host run (dictlearn.distributed)
  c.lock()
  return c


def distributed_config():
  """The `distributed` section: how the processes of a multi-host run find each other.

  Every host runs the same command; on TPU VMs (`--worker=all`), under SLURM (`srun`)
  and Open MPI JAX detects the address, count and id; elsewhere give all three, e.g.
  `--config.distributed.coordinator_address=host0:1234 --config.distributed.num_processes=2
  --config.distributed.process_id=$i`.
  """
  d = ml_collections.ConfigDict()
  d.initialize = 'auto'  # jax.distributed.initialize: 'auto' (when the fields below or a SLURM/MPI launch ask), 'always' (TPU pod slices), 'never'
  d.coordinator_address = ''  # host:port of process 0's coordinator; '' = from the environment
  d.num_processes = -1  # processes in the run; -1 = from the environment
  d.process_id = -1  # this process's index, 0 on the coordinator; -1 = from the environment
  d.initialization_timeout_s = 300  # seconds to wait for every process to join before failing
  d.heartbeat_timeout_s = 100  # a process silent this long is dead: the others stop with an error
  d.shutdown_timeout_s = 300  # seconds a finishing process waits for the others at exit
  return d
