"""The main job end to end on its tiny variant: harvest, train, evaluate in the model."""
import json

import pytest

from dictlearn import pipeline
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import metrics as metrics_lib
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
  # CE loss recovered is in the run's metrics too, beside the trainer's held-out FVU.
  evaluation = [r for r in metrics_lib.read_metrics(str(tmp_path / 'sae'), 'eval')
                if r['step'] == 30][-1]
  assert evaluation['ce_loss_recovered'] == summary['ce_loss_recovered']
  assert evaluation['fvu'] == summary['fvu']
  # Paths in the summary are relative to the pipeline's directory; the directory
  # itself (not only sae/) is accepted wherever a run's workdir is.
  assert summary['run'] == 'sae' and summary['store'].startswith('activations/')
  assert ckpt_lib.run_directory(str(tmp_path)) == str(tmp_path / 'sae')
