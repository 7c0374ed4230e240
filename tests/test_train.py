"""The trainer end to end on the tiny config: pulse, sharding, resume, preemption, bad input."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dictlearn.data import store as store_lib
from dictlearn.data import synthetic
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import metrics as metrics_lib
from dictlearn.train.trainer import NonFiniteError, train_and_evaluate
from experiments import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = tiny.get_config()
  config.unlock()
  for dotted, value in overrides.items():
    *path, leaf = dotted.split('.')
    node = config
    for part in path:
      node = node[part]
    node[leaf] = value
  config.lock()
  return config


def losses(workdir):
  return np.array([r['loss'] for r in metrics_lib.read_metrics(str(workdir), 'train')])


def final_state(workdir):
  _, state = ckpt_lib.restore_arrays(ckpt_lib.checkpoint_dir(str(workdir)))
  return state


def test_pulse_loss_falls(tmp_path):
  summary = train_and_evaluate(tiny_config(**{'train.num_steps': 150}), str(tmp_path))
  history = losses(tmp_path)
  assert summary['step'] == 150
  assert history[-1] < 0.5 * history[0]
  assert 0 <= summary['eval']['fvu'] < 1
  assert summary['eval']['l0'] <= 4 + 1e-6
  assert os.path.exists(tmp_path / 'tensorboard')


def test_sharded_equals_single_device(tmp_path):
  common = {'train.num_steps': 20, 'train.log_every': 1, 'train.eval_batches': 0}
  train_and_evaluate(tiny_config(**common, **{'mesh.shape': (1, 1)}), str(tmp_path / 'one'))
  train_and_evaluate(tiny_config(**common, **{'mesh.shape': (2, 4)}), str(tmp_path / 'mesh'))
  one, mesh = losses(tmp_path / 'one'), losses(tmp_path / 'mesh')
  assert len(one) == len(mesh) == 20
  np.testing.assert_allclose(mesh, one, rtol=1e-5, atol=1e-5)


def test_resume_is_bitwise_identical(tmp_path):
  config = tiny_config(**{'train.num_steps': 20, 'train.checkpoint_every': 100})
  train_and_evaluate(config, str(tmp_path / 'straight'))
  stopped = train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at=7)
  assert stopped['stopped_at'] == 7 and stopped['step'] == 7 and 'eval' in stopped
  train_and_evaluate(config, str(tmp_path / 'resumed'))
  a, b = final_state(tmp_path / 'straight'), final_state(tmp_path / 'resumed')
  assert int(a['step']) == int(b['step']) == 20
  for path, x in jax.tree_util.tree_leaves_with_path(a):
    y = jax.tree_util.tree_leaves_with_path(b)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(dict(y)[path]),
                                  err_msg=jax.tree_util.keystr(path))


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  config = tiny_config(**{'train.num_steps': 10, 'mesh.shape': (2, 4)})
  train_and_evaluate(config, str(tmp_path), stop_at=5)
  resumed = train_and_evaluate(tiny_config(**{'train.num_steps': 10, 'mesh.shape': (8, 1)}),
                               str(tmp_path))
  assert resumed['step'] == 10
  assert np.isfinite(resumed['eval']['fvu'])


def test_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
  run, new = str(tmp_path / 'run'), str(tmp_path / 'new')
  train_and_evaluate(tiny_config(**{'train.num_steps': 5}), run)
  saved = sorted(os.listdir(ckpt_lib.checkpoint_dir(run)))
  # Resumed with another architecture: the config names the field, with both values.
  with pytest.raises(ValueError, match="sae.architecture: the checkpoint has 'topk', the "
                                       "command line 'batchtopk'"):
    train_and_evaluate(tiny.get_config('batchtopk'), run)
  # A new run from that checkpoint (init_from): its arrays are refused by name.
  other = tiny.get_config('batchtopk')
  with other.unlocked():
    other.train.init_from = ckpt_lib.checkpoint_dir(run)
  with pytest.raises(ValueError, match=r"buffers: expected \['selection_floor', 'threshold'\]"):
    train_and_evaluate(other, new)
  # Nothing already written is lost: the checkpoint still restores as it was.
  assert sorted(os.listdir(ckpt_lib.checkpoint_dir(run))) == saved
  assert int(final_state(run)['step']) == 5


def test_sigterm_saves_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'dictlearn.train', '--config', 'experiments/tiny.py',
         '--workdir', str(workdir), '--config.train.num_steps=100000',
         '--config.train.checkpoint_every=1000000', '--config.train.log_every=20']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  metrics_file = workdir / 'metrics.jsonl'
  deadline = time.time() + 120
  while time.time() < deadline and not (metrics_file.exists() and metrics_file.stat().st_size):
    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err.decode()[-3000:]
  step = ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(str(workdir)))
  assert step is not None and 0 < step < 100000
  resumed = subprocess.run(cmd[:-3] + ['--config.train.num_steps=%d' % (step + 10)], cwd=REPO,
                           env=env, capture_output=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
  assert ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(str(workdir))) == step + 10


# ---------------------------------------------------------------------------
# Bad input: a clear error, and nothing already written lost
# ---------------------------------------------------------------------------

def test_incomplete_store_is_refused(tmp_path):
  path = str(tmp_path / 'store')
  writer = store_lib.StoreWriter(path, d_model=16, metadata={'model': 'test', 'site': 'test'})
  writer.append(np.ones((100, 16), np.float32))
  del writer
  with pytest.raises(Exception, match='incomplete'):
    train_and_evaluate(tiny_config(**{'data.store': path}), str(tmp_path / 'run'))


def test_d_model_mismatch_names_both(tmp_path):
  with pytest.raises(ValueError, match=r'(?s)(16.*32|32.*16)'):
    train_and_evaluate(tiny_config(**{'data.d_model': 32}), str(tmp_path))


def test_nonfinite_loss_names_step_and_metric(tmp_path):
  train_and_evaluate(tiny_config(**{'train.num_steps': 10}), str(tmp_path), stop_at=5)
  before = ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(str(tmp_path)))
  bad = tiny_config(**{'train.num_steps': 10, 'optim.learning_rate': 1e30})
  with pytest.raises(NonFiniteError, match=r'at step \d+'):
    train_and_evaluate(bad, str(tmp_path))
  assert ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(str(tmp_path))) == before == 5


def test_batch_not_divisible_by_data_axis(tmp_path):
  train_and_evaluate(tiny_config(**{'train.num_steps': 4}), str(tmp_path))
  with pytest.raises(ValueError, match='not divisible by the data axis size 8'):
    train_and_evaluate(tiny_config(**{'train.batch_size': 60, 'mesh.shape': (8, 1)}),
                       str(tmp_path))
  assert ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(str(tmp_path))) == 4


def test_unknown_architecture_lists_valid_ones(tmp_path):
  with pytest.raises(ValueError, match='(?s)topk.*jumprelu|jumprelu.*topk'):
    train_and_evaluate(tiny_config(**{'sae.architecture': 'topkk'}), str(tmp_path))


def test_unknown_config_key_on_command_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'dictlearn.train', '--config', 'experiments/tiny.py',
       '--workdir', str(tmp_path), '--config.sae.kk=3'], cwd=REPO, capture_output=True,
      timeout=120)
  assert result.returncode != 0
  assert b"config.sae has no field 'kk'" in result.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_batchtopk_threshold_is_learned_and_saved(tmp_path):
  summary = train_and_evaluate(tiny_config(**{'sae.architecture': 'batchtopk',
                                              'train.num_steps': 60}), str(tmp_path))
  threshold = float(final_state(tmp_path)['buffers']['threshold'])
  assert threshold > 0
  # Inference with the learned threshold keeps about k latents per token.
  assert 1 <= summary['eval']['l0'] <= 3 * 4, summary['eval']
