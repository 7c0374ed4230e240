"""A tiny trained SAE on a tokenised synthetic store, for the analysis tests."""
import os

import numpy as np

from dictlearn.data import store as store_lib
from dictlearn.data import synthetic
from experiments import tiny

N_ROWS = 4096
D_MODEL = 16
VOCAB = 300


def write_store(path, *, site='blocks.0.hook_resid_post', model='tiny-model', seed=0):
  """A finished store of synthetic rows with made-up token ids, documents and positions."""
  gen = synthetic.SyntheticGenerator(n_true=64, d_model=D_MODEL, mean_active=3.0,
                                     power_law_exponent=0.5, noise_std=0.0, seed=seed)
  x, _ = gen.batch(0, N_ROWS)
  rng = np.random.default_rng(seed)
  lengths = rng.integers(20, 300, size=N_ROWS)
  doc = np.repeat(np.arange(N_ROWS), lengths)[:N_ROWS]
  starts = np.concatenate([[0], np.cumsum(lengths)])
  pos = np.arange(N_ROWS) - starts[doc]
  tokens = rng.integers(0, VOCAB, size=N_ROWS)
  writer = store_lib.StoreWriter(path, D_MODEL, chunk_rows=512, shard_chunks=2,
                                 metadata={'model': model, 'site': site})
  writer.append(x, tokens=tokens, doc=doc, pos=pos)
  writer.finish()
  return path


def train_run(root, architecture='topk', num_steps=10):
  """Trains a tiny SAE of 128 latents on a fresh store under `root`; returns the workdir."""
  from dictlearn.train.trainer import train_and_evaluate  # after conftest's XLA_FLAGS
  store = write_store(os.path.join(root, 'store'))
  config = tiny.get_config(architecture)
  config.unlock()
  config.data.store = store
  config.data.heldout_tokens = 512
  config.train.num_steps = num_steps
  config.train.checkpoint_every = num_steps
  config.train.eval_batches = 0
  if architecture == 'batchtopk':
    config.sae.sparse_capacity = 16
  config.lock()
  workdir = os.path.join(root, f'sae_{architecture}')
  train_and_evaluate(config, workdir)
  return workdir
