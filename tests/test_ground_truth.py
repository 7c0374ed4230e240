"""Ground truth: SAEs trained by the full trainer recover a known dictionary in superposition.

Data: 512 true unit directions in 64 dimensions, about 8 active per row with
power-law firing frequencies (experiments/synthetic.py). A true direction counts
as recovered when some decoder row has cosine >= 0.9 with it.

Measured on the 2-core CPU with nothing else running (recovered fraction, wall
time of the run; `python tools/ground_truth.py`, BUILD_NOTES.md): topk 0.986
(11 s), relu_l1 1.000 (11 s), batchtopk 0.955 (58 s), jumprelu with AuxK 0.982
(72 s; 0.973 and 0.975 with seeds 1 and 2).
"""
import pytest

from experiments import synthetic

# The bar: at least 90% of the true directions recovered at cosine >= 0.9.
TARGET = 0.9


def recipe_config(arch):
  """The architecture's recipe (experiments/synthetic.py) on one device."""
  config = synthetic.recipe_config(arch)
  config.mesh.shape = (1, 1)
  return config


@pytest.mark.slow
@pytest.mark.parametrize('arch', sorted(synthetic.RECIPES))
def test_recovers_true_directions(arch, tmp_path):
  from dictlearn.train.trainer import train_and_evaluate
  summary = train_and_evaluate(recipe_config(arch), str(tmp_path))
  assert summary['eval']['recovered_fraction'] >= TARGET, summary['eval']
