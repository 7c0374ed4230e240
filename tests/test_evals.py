"""Evaluation: reconstruction metrics on held-out rows, and CE loss recovered in SmolLM2."""
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn import evals
from dictlearn.sae import make_sae
from experiments import base

SITE = 'blocks.3.hook_resid_post'


def exact_topk(d_model):
  """A TopK SAE that reconstructs exactly: latents +e_i and -e_i, k = d_model."""
  c = base.get_config()
  c.unlock()
  c.sae.architecture, c.sae.n_latents, c.sae.k, c.sae.aux_k = 'topk', 2 * d_model, d_model, 0
  sae = make_sae(c.sae, d_model)
  eye = jnp.eye(d_model)
  params = {'W_enc': jnp.concatenate([eye, -eye], axis=1), 'b_enc': jnp.zeros(2 * d_model),
            'W_dec': jnp.concatenate([eye, -eye], axis=0), 'b_dec': jnp.zeros(d_model)}
  _, buffers = sae.init(__import__('jax').random.key(0))
  return sae, params, buffers


def contexts(tokenizer, n=4, seq=48):
  import pydoc_data.topics as topics
  ids = tokenizer.encode(topics.topics['assert'] + topics.topics['if'] + topics.topics['for'],
                         add_bos=False)
  rows = [[tokenizer.bos_id] + ids[i * (seq - 1):(i + 1) * (seq - 1)] for i in range(n)]
  return np.array(rows, np.int32)


def test_reconstruction_metrics_of_an_exact_sae():
  sae, params, buffers = exact_topk(8)
  x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
  out = evals.evaluate_reconstruction(sae, params, buffers, [x[:200], x[200:]],
                                      dense_threshold=0.9)
  assert out['rows'] == 300 and out['fvu'] < 1e-10 and out['mse'] < 1e-10
  assert out['l0'] == pytest.approx(8, abs=0.05)
  assert out['dead_fraction'] == 0 and out['dense_fraction'] == 0


def test_ce_loss_recovered_bounds(smollm2):
  cfg, params, tokenizer = smollm2
  ctx = contexts(tokenizer)
  sae, p, b = exact_topk(cfg.d_model)
  exact = evals.ce_loss_recovered(sae, p, b, cfg, params, ctx, site=SITE, data_scale=0.5,
                                  bos_id=tokenizer.bos_id)
  assert exact['ce_loss_recovered'] == pytest.approx(1.0, abs=1e-3)
  assert exact['kl_spliced'] < 1e-4
  assert exact['ce_zero_ablation'] > exact['ce_clean'] + 0.5
  zero = dict(p, W_dec=jnp.zeros_like(p['W_dec']))
  erased = evals.ce_loss_recovered(sae, zero, b, cfg, params, ctx, site=SITE, data_scale=0.5,
                                   bos_id=tokenizer.bos_id)
  assert erased['ce_loss_recovered'] == pytest.approx(0.0, abs=1e-3)
  assert erased['ce_clean'] == pytest.approx(exact['ce_clean'], rel=1e-6)
