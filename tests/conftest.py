"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def smollm2():
  """SmolLM2-135M-Instruct from the cache, loaded once: (cfg, params, tokenizer)."""
  from dictlearn import lm  # after XLA_FLAGS above
  return lm.load_gguf()


@pytest.fixture(scope='session')
def tiny_feature_run(tmp_path_factory):
  """A tiny TopK SAE trained on a tokenised synthetic store: its workdir."""
  import features_testlib  # after XLA_FLAGS above
  return features_testlib.train_run(str(tmp_path_factory.mktemp('feature_run')))


@pytest.fixture(scope='session')
def small_topk_sae(smollm2):
  """A freshly initialised TopK SAE (256 latents, k 8) as wide as SmolLM2: (sae, params, buffers)."""
  import jax  # after XLA_FLAGS above
  from dictlearn.sae import make_sae
  from experiments import tiny
  sae_cfg = tiny.get_config('topk').sae
  sae_cfg.unlock()
  sae_cfg.n_latents, sae_cfg.k = 256, 8
  sae = make_sae(sae_cfg, smollm2[0].d_model)
  return (sae, *sae.init(jax.random.PRNGKey(0)))
