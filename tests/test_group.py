"""Several SAEs on one read of the data: the same runs as alone, resumable, one batch read."""
import jax
import numpy as np
import pytest

from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import group as group_lib
from dictlearn.train import metrics as metrics_lib
from dictlearn.train.trainer import train_and_evaluate
from test_train import tiny_config  # pylint: disable=g-bad-import-order

# Three runs that share the data order but not their shape, k or learning rate.
MEMBERS = ({'sae.n_latents': 128}, {'sae.n_latents': 64, 'sae.k': 2},
           {'sae.n_latents': 128, 'optim.learning_rate': 1e-3})


def config(**overrides):
  return tiny_config(**{'train.num_steps': 16, 'train.log_every': 1,
                        'train.checkpoint_every': 100, **overrides})


def state(workdir):
  _, s = ckpt_lib.restore_arrays(ckpt_lib.checkpoint_dir(str(workdir)))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(s)}


def losses(workdir):
  return np.array([r['loss'] for r in metrics_lib.read_metrics(str(workdir), 'train')])


@pytest.fixture(scope='module')
def together(tmp_path_factory):
  out = tmp_path_factory.mktemp('group')
  dirs = [str(out / f'm{i}') for i in range(len(MEMBERS))]
  summaries = group_lib.train_group([config(**m) for m in MEMBERS], dirs,
                                    eval_steps=[(8,)] * len(MEMBERS))
  return dirs, summaries


@pytest.mark.slow
def test_group_equals_runs_alone(together, tmp_path):
  dirs, summaries = together
  for i, overrides in enumerate(MEMBERS):
    alone = tmp_path / f'alone{i}'
    single = train_and_evaluate(config(**overrides), str(alone))
    np.testing.assert_allclose(losses(dirs[i]), losses(alone), rtol=1e-5, atol=1e-5)
    a, b = state(dirs[i]), state(alone)
    for name, x in b.items():
      np.testing.assert_allclose(a[name], x, rtol=1e-5, atol=1e-5, err_msg=f'member {i} {name}')
    evals = metrics_lib.read_metrics(dirs[i], 'eval')
    assert [r['step'] for r in evals] == [8, 16]
    assert evals[-1]['fvu'] == pytest.approx(single['eval']['fvu'], rel=1e-4)
    assert summaries[i]['step'] == 16 and summaries[i]['eval']['fvu'] == evals[-1]['fvu']
    record = metrics_lib.read_metrics(dirs[i], 'train')[-1]
    assert record['group_size'] == 3 and record['mfu'] > 0


@pytest.mark.slow
def test_group_stops_and_resumes_bitwise_and_a_run_ahead_joins(together, tmp_path):
  dirs, _ = together
  configs = [config(**m) for m in MEMBERS]
  resumed = [str(tmp_path / f'r{i}') for i in range(len(MEMBERS))]
  group_lib.train_group(configs, resumed, eval_steps=[(8,)] * 3, stop_at=5)
  assert [ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(d)) for d in resumed] == [5, 5, 5]
  group_lib.train_group(configs, resumed, eval_steps=[(8,)] * 3)
  for a, b in zip(dirs, resumed):
    sa, sb = state(a), state(b)
    for name, x in sa.items():
      np.testing.assert_array_equal(sb[name], x, err_msg=name)
  # A run trained alone to step 8 joins a group whose other run starts from 0.
  ahead, fresh = str(tmp_path / 'ahead'), str(tmp_path / 'fresh')
  train_and_evaluate(configs[0], ahead, stop_at=8)
  group_lib.train_group([configs[0], configs[1]], [ahead, fresh], eval_steps=[(8,), (8,)])
  for mine, theirs in ((ahead, dirs[0]), (fresh, dirs[1])):
    for name, x in state(theirs).items():
      np.testing.assert_allclose(state(mine)[name], x, rtol=1e-5, atol=1e-5, err_msg=name)
  assert [r['step'] for r in metrics_lib.read_metrics(ahead, 'eval')] == [8, 16]


def test_runs_with_another_data_order_are_refused(tmp_path):
  with pytest.raises(ValueError, match='do not share their data order'):
    group_lib.train_group([config(), config(seed=1)], [str(tmp_path / 'a'), str(tmp_path / 'b')])
  assert not list(tmp_path.iterdir())  # nothing written
