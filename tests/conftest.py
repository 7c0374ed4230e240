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
