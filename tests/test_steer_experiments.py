"""The steering reproductions' tiny variants on SmolLM2 (the real figures are in README)."""
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.analysis import actadd
from dictlearn.analysis import feature_steering
from dictlearn.analysis import injection
from dictlearn.analysis import steering
from dictlearn.lm import llama
from experiments import steer_actadd
from experiments import steer_features
from experiments import steer_injection

SITE = 'blocks.12.hook_resid_post'


@pytest.fixture(scope='module')
def planted_sae(smollm2, small_topk_sae):
  """A random TopK SAE at SITE whose feature 5 is the direction of the token ' Python' there.

  CI has no trained SAE; the planted feature (the mean activation on ' Python' minus the mean
  on the other tokens of a few sentences) stands in for the main job's Python feature.
  """
  cfg, params, tok = smollm2
  sae, weights, buffers = small_topk_sae
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
  result = feature_steering.run(config, smollm2, sae=planted_sae)
  print(feature_steering.summary(result))
  rows = result['conditions']
  assert list(rows) == ['baseline', 'clamp 0', 'clamp 1x max', 'clamp 2x max', 'clamp 3x max']
  assert result['monotone_p_top_logit']
  assert rows['clamp 3x max']['mentions'] > rows['baseline']['mentions']
  assert rows['clamp 3x max']['feature_on_generated'] > rows['baseline']['feature_on_generated']


def test_actadd_tiny(smollm2):
  config = steer_actadd.get_config('tiny')
  result = actadd.run(config, smollm2)
  print(actadd.summary(result))
  everywhere = result['layers'][6]['all']
  assert everywhere['perplexity_ratio'][0] == 1.0
  assert everywhere['monotone']  # " love" - " hate" moves the next token towards positive words
  assert max(everywhere['perplexity_ratio']) < 1.5
  assert set(result['completions']) == {'0', '0.2', '0.4'}


def test_injection_scoring_rule():
  assert injection.claims_detection('Yes, I detect an injected thought about the ocean.')
  assert injection.claims_detection('I notice something unusual.')
  assert not injection.claims_detection('No, I do not detect an injected thought.')
  assert not injection.claims_detection("I don't detect anything; yes, this is a control.")
  assert not injection.claims_detection('The ocean is vast.')
  assert injection.mentions('Thoughts of Oceans.', 'ocean')
  assert not injection.mentions('oceanic', 'ocean')


def test_injected_concepts_tiny(smollm2):
  config = steer_injection.get_config('tiny')
  result = injection.run(config, smollm2)
  print(injection.summary(result))
  rows = result['layers'][15]['rows']
  assert set(rows) == {'0', '16'} and result['trials_per_cell'] == 4
  for row in rows.values():
    assert 0 <= row['identifies'] <= row['claims_detection'] <= 1
