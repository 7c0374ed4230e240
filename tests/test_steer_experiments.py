"""The steering reproductions' tiny variants on SmolLM2 (the real figures are in README)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.analysis import steer_experiments
from dictlearn.analysis import steering
from dictlearn.lm import llama
from dictlearn.sae import make_sae
from experiments import steer_features
from experiments import tiny

SITE = 'blocks.12.hook_resid_post'


@pytest.fixture(scope='module')
def planted_sae(smollm2):
  """A random TopK SAE at SITE whose feature 5 is the direction of the token ' Python' there.

  CI has no trained SAE; the planted feature (the mean activation on ' Python' minus the mean
  on the other tokens of a few sentences) stands in for the main job's Python feature.
  """
  cfg, params, tok = smollm2
  sae_cfg = tiny.get_config('topk').sae
  sae_cfg.unlock()
  sae_cfg.n_latents, sae_cfg.k = 256, 8
  sae = make_sae(sae_cfg, cfg.d_model)
  weights, buffers = sae.init(jax.random.PRNGKey(0))
  ids = tok.encode('I write Python code every day. Python is easy to read, and Python runs '
                   'everywhere.')
  _, acts = llama.forward(params, cfg, jnp.asarray([ids]), read_sites=[SITE], return_logits=False)
  is_python = np.asarray(ids) == tok.encode(' Python')[0]
  x = np.asarray(acts[SITE][0, 1:])
  direction = x[is_python[1:]].mean(0) - x[~is_python[1:]].mean(0)
  direction = jnp.asarray(direction / np.linalg.norm(direction))
  weights = dict(weights, W_dec=weights['W_dec'].at[5].set(direction),
                 W_enc=weights['W_enc'].at[:, 5].set(direction))
  return steering.SaeAtSite(sae, SITE, cfg.name, tok.bos_id, weights, buffers, jnp.float32(0.135))


def test_feature_steering_tiny(smollm2, planted_sae):
  config = steer_features.get_config('tiny')
  config.unlock()
  config.feature, config.max_activation = 5, 7.0
  result = steer_experiments.run_feature_steering(config, model=smollm2, sae=planted_sae)
  print(steer_experiments.feature_steering_table(result))
  rows = result['conditions']
  assert list(rows) == ['baseline', 'clamp 0', 'clamp 1x max', 'clamp 2x max', 'clamp 3x max']
  assert result['monotone_p_top_logit']
  assert rows['clamp 3x max']['mentions'] > rows['baseline']['mentions']
  assert rows['clamp 3x max']['feature_on_generated'] > rows['baseline']['feature_on_generated']
