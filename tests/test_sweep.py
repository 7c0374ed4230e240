"""The sweep runner: expansion, sequential runs with evaluation points, commands, collect."""
import json
import os

import pytest

from dictlearn.scaling import sweep as sweep_lib
from dictlearn.train import metrics as metrics_lib
from experiments import scaling_sweep


def test_expand_and_commands(tmp_path):
  sweep = scaling_sweep.get_config('smoke')
  runs = sweep_lib.expand(sweep)
  assert [r.overrides['sae.n_latents'] for r in runs] == [32, 64, 128]
  assert all(r.overrides['train.num_steps'] == 40 for r in runs)
  lines = sweep_lib.commands(sweep, str(tmp_path))
  assert len(lines) == 3 and all('--config.sae.n_latents=' in line for line in lines)


def test_bad_override_is_named(tmp_path):
  sweep = scaling_sweep.get_config('smoke')
  sweep.unlock()
  sweep.overrides = ('sae.kk=3',)
  with pytest.raises(KeyError, match="config.sae has no field 'kk'"):
    sweep_lib.run_config(sweep, sweep_lib.expand(sweep)[0])


def test_run_sweep_records_every_point_and_resumes(tmp_path):
  sweep = scaling_sweep.get_config('smoke')
  records = sweep_lib.run_sweep(sweep, str(tmp_path))
  assert len(records) == 3 * 2
  # The three runs share their data order: trained as one group, each batch read once.
  for run in sweep_lib.expand(sweep):
    assert metrics_lib.read_metrics(run.workdir(str(tmp_path)), 'train')[-1]['group_size'] == 3
  assert sorted({r['step'] for r in records}) == [20, 40]
  for r in records:
    assert r['tokens'] == r['step'] * 64 and r['flops_sparse'] < r['flops_dense']
    assert 0 < r['fvu'] < 1.5 and r['l0'] <= 4 + 1e-6 and r['alive_latents'] <= r['n_latents']
  mtimes = {d: os.path.getmtime(tmp_path / d / 'metrics.jsonl')
            for d in os.listdir(tmp_path) if (tmp_path / d).is_dir()}
  again = sweep_lib.run_sweep(sweep, str(tmp_path))  # everything done: nothing retrained
  assert again == records
  assert mtimes == {d: os.path.getmtime(tmp_path / d / 'metrics.jsonl') for d in mtimes}
  with open(tmp_path / 'results.jsonl') as f:
    assert [json.loads(line) for line in f] == records
