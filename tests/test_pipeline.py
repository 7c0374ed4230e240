"""The main job end to end on its tiny variant: harvest, train, evaluate in the model."""
import json

import pytest

from dictlearn import pipeline
from experiments import smollm2_topk


@pytest.mark.slow
def test_main_job_tiny(tmp_path):
  summary = pipeline.run(smollm2_topk.get_config('tiny'), str(tmp_path))
  assert summary['harvested_tokens'] == 3000 and summary['steps'] == 30
  assert 0 < summary['fvu'] < 1 and summary['l0'] <= 8 + 1e-6
  assert summary['ce_clean'] < summary['ce_spliced'] < summary['ce_zero_ablation']
  assert 0 < summary['ce_loss_recovered'] < 1
  with open(tmp_path / 'summary.json') as f:
    assert json.load(f)['ce_loss_recovered'] == summary['ce_loss_recovered']
