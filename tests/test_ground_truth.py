"""Ground truth: SAEs trained by the full trainer recover a known dictionary in superposition.

Data: 512 true unit directions in 64 dimensions, about 8 active per row with
power-law firing frequencies (experiments/synthetic.py). A true direction counts
as recovered when some decoder row has cosine >= 0.9 with it.
"""
import pytest

from experiments import synthetic

# architecture -> config overrides that train it on this data.
RECIPES = {
    'topk': {'train.num_steps': 1500},
}


def recipe_config(arch):
  config = synthetic.get_config(arch)
  config.unlock()
  config.mesh.shape = (1, 1)
  config.data.synthetic.n_tokens = 2 ** 19
  for dotted, value in RECIPES[arch].items():
    section, field = dotted.split('.')
    config[section][field] = value
  config.lock()
  return config


@pytest.mark.slow
@pytest.mark.parametrize('arch', sorted(RECIPES))
def test_recovers_true_directions(arch, tmp_path):
  from dictlearn.train.trainer import train_and_evaluate
  summary = train_and_evaluate(recipe_config(arch), str(tmp_path))
  assert summary['eval']['recovered_fraction'] >= 0.9, summary['eval']
