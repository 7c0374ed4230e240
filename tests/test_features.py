"""Feature statistics: blocked encoding equals sae.encode, the pass equals a dense
reference, a SIGKILLed pass resumes to the same results, bad input is refused."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import features_testlib
from dictlearn.analysis import encoding
from dictlearn.analysis import features
from dictlearn.analysis import logits
from dictlearn.analysis import statistics
from dictlearn.data import store as store_lib
from dictlearn.sae import make_sae
from dictlearn.train import checkpoint as ckpt_lib
from experiments import tiny

_OPTIONS = features.Options(batch_size=512, top_n=8, n_samples=16, contexts_top=4,
                            contexts_per_quantile=2, window_before=3, window_after=2,
                            progress=False)


def _random_sae(architecture, n=128, d=16):
  c = tiny.get_config(architecture).sae
  c.unlock()
  c.n_latents, c.encoder_block_size = n, 0
  c.lock()
  sae = make_sae(c, d)
  params, buffers = sae.init(jax.random.key(0))
  params = dict(params, b_enc=0.3 * jax.random.normal(jax.random.key(3), (n,)),
                b_dec=0.1 * jax.random.normal(jax.random.key(4), (d,)))
  if architecture == 'batchtopk':
    buffers = dict(buffers, threshold=jnp.float32(0.4))
  if architecture == 'jumprelu':
    params['log_threshold'] = jnp.full((n,), jnp.log(0.3))
  return sae, params, buffers


@pytest.mark.parametrize('architecture', encoding.ARCHITECTURES)
def test_blocked_statistics_equal_dense_encode(architecture):
  """One batch in blocks of 16 latents (on 4 shards for topk and jumprelu, 1 for the
  others): count, sum, histogram, top rows and priority samples equal those of the
  dense `sae.encode` code."""
  sae, params, buffers = _random_sae(architecture)
  x = 2.0 * jax.random.normal(jax.random.key(1), (64, 16))
  dense = np.asarray(sae.encode(params, buffers, x))[:60]  # rows 60.. are padding
  rows = 100 + np.arange(60)
  enc = encoding.make_encoder(sae)
  fired = dense > 0
  bins = np.asarray(encoding.hist_bin(jnp.asarray(dense)))
  hist = np.stack([((bins == b) & fired).sum(0) for b in range(encoding.HIST_BINS)], 1)
  scores = np.where(fired, np.asarray(encoding.sample_score(jnp.asarray(rows)[:, None],
                                                            jnp.arange(128)[None, :])), -1)
  for shards in ((4,) if architecture in ('topk', 'jumprelu') else (1,)):
    mesh = encoding.latent_mesh(jax.devices()[:shards])
    arrays = encoding.place(mesh, encoding.encoder_arrays(enc, params, buffers),
                            encoding.array_specs())
    state = encoding.place(mesh, encoding.init_state(128, 4, 6), encoding.state_specs())
    update = encoding.make_update(enc, mesh, encoding.check_block_size(enc, mesh, 16))
    state, _ = update(state, arrays, x, np.arange(64) < 60, np.int32(100))
    state = jax.device_get(state)
    np.testing.assert_array_equal(state['count'], fired.sum(0))
    np.testing.assert_allclose(state['act_sum'], dense.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state['hist'], hist)
    order = np.argsort(-np.where(fired, dense, -1), axis=0, kind='stable')[:4].T
    top = np.take_along_axis(dense.T, order, 1)
    # Blocks of latents round the matmul differently from the whole: values within 1 ulp.
    np.testing.assert_allclose(state['top_values'], np.where(top > 0, top, -1), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(state['top_rows'], np.where(top > 0, rows[order], -1))
    order = np.argsort(-scores, axis=0, kind='stable')[:6].T
    picked = np.take_along_axis(scores.T, order, 1)
    np.testing.assert_array_equal(state['sample_rows'], np.where(picked > 0, rows[order], -1))
    values = np.take_along_axis(dense.T, order, 1)
    np.testing.assert_allclose(state['sample_values'][picked > 0], values[picked > 0], rtol=1e-5,
                               atol=1e-6)
  top_values, top_latents = encoding.top_features(enc, encoding.encoder_arrays(
      enc, params, buffers), x, 5, 32)
  np.testing.assert_allclose(np.asarray(top_values)[:60], -np.sort(-dense, 1)[:, :5], rtol=1e-6)


def _dense_reference(workdir):
  run = features.open_run(workdir)
  _, state = ckpt_lib.restore_arrays(ckpt_lib.checkpoint_dir(workdir))
  x = np.asarray(run.reader.read_rows(0, run.reader.n_rows), np.float32) * run.data_scale
  return np.asarray(run.sae.encode(state['params'], state['buffers'], jnp.asarray(x)))


@pytest.mark.parametrize('architecture', ['topk', 'relu_l1'])
def test_pass_matches_dense_reference_and_contexts(architecture, tiny_feature_run, tmp_path):
  """TopK (sparse folding, contexts from its codes) and a threshold architecture (dense
  blocks, contexts recomputed pairwise from the store) against the dense code."""
  workdir = (tiny_feature_run if architecture == 'topk' else
             features_testlib.train_run(str(tmp_path), architecture, num_steps=2))
  out = features.compute_statistics(workdir, out=str(tmp_path / 'f'), options=_OPTIONS)
  stats = features.load_statistics(out)
  dense = _dense_reference(workdir)
  n_rows = dense.shape[0]
  assert stats.n_latents == 128 and stats.site == 'blocks.0.hook_resid_post'
  assert stats.model == 'tiny-model' and stats.n_tokens == n_rows
  np.testing.assert_allclose(stats.frequency, (dense > 0).mean(0))
  np.testing.assert_allclose(stats.max_activation, dense.max(0), rtol=1e-6)
  fired = np.maximum((dense > 0).sum(0), 1)
  np.testing.assert_allclose(stats.mean_activation, dense.sum(0) / fired, rtol=1e-4)
  reader = store_lib.StoreReader(stats.meta['store'])
  tokens, doc = np.asarray(reader.read_tokens(0, n_rows)), np.asarray(reader.read_doc(0, n_rows))
  live = np.nonzero(stats.count > 0)[0]
  checked = 0
  for i in live[:12]:
    f = stats.feature(i)
    assert sum(f['histogram']['counts']) == f['count']
    assert [r for _, r in f['top']] == list(np.argsort(-dense[:, i], kind='stable')[:len(f['top'])])
    kinds = {c['quantile'] for c in f['contexts']}
    assert 0 in kinds and kinds <= set(range(_OPTIONS.quantiles + 1))
    for c in f['contexts']:
      window = np.arange(c['row'] - c['centre'], c['row'] - c['centre'] + len(c['tokens']))
      assert (doc[window] == doc[c['row']]).all()  # never across documents
      np.testing.assert_array_equal(c['tokens'], tokens[window])
      np.testing.assert_allclose(c['acts'], dense[window, i], rtol=1e-5, atol=1e-5)
      assert c['acts'][c['centre']] == pytest.approx(c['value'], rel=1e-6) and c['value'] > 0
      checked += 1
  assert checked > 50
  # Quantile samples lie in their buckets: a higher bucket never holds a smaller value.
  f = stats.feature(int(live[np.argmax(stats.count[live])]))
  by_q = {}
  for c in f['contexts']:
    if c['quantile'] > 0:
      by_q.setdefault(c['quantile'], []).append(c['value'])
  lows = [(min(v), max(v)) for _, v in sorted(by_q.items())]
  assert len(lows) == _OPTIONS.quantiles
  assert all(a[1] <= b[0] for a, b in zip(lows, lows[1:]))
  assert stats.feature(int(live[0]))['promoted'] == []  # a synthetic store has no model


def test_logit_effects_match_numpy():
  cfg = ml_collections.ConfigDict({'tie_embeddings': True})
  rng = np.random.default_rng(0)
  lm_params = {'embed': rng.standard_normal((50, 8)).astype(np.float32),
               'final_norm': rng.uniform(0.5, 2, 8).astype(np.float32)}
  w_dec = rng.standard_normal((5, 8)).astype(np.float32)
  out = logits.logit_effects(w_dec, cfg, lm_params, 3, data_scale=2.0)
  effect = (w_dec / 2.0 * lm_params['final_norm']) @ lm_params['embed'].T
  np.testing.assert_array_equal(out['promoted_ids'], np.argsort(-effect, 1)[:, :3])
  np.testing.assert_array_equal(out['suppressed_ids'], np.argsort(effect, 1)[:, :3])
  np.testing.assert_allclose(out['suppressed_values'], np.sort(effect, 1)[:, :3], rtol=1e-5)
  with pytest.raises(ValueError, match='d_model=4'):
    logits.logit_effects(w_dec[:, :4], cfg, lm_params, 3)


def _arrays(out):
  found = {}
  for group in ('statistics', 'contexts'):
    for name in sorted(os.listdir(os.path.join(out, group))):
      found[f'{group}/{name}'] = np.asarray(
          statistics.zarr_io.read(os.path.join(out, group, name)))
  return found


@pytest.mark.slow
def test_sigkilled_pass_resumes_to_the_same_results(tiny_feature_run, tmp_path):
  out = str(tmp_path / 'killed')
  options = dataclasses.replace(_OPTIONS, batch_size=64, save_every=1)
  command = [sys.executable, '-m', 'dictlearn.analysis.features', '--workdir', tiny_feature_run,
             '--out', out, '--no_progress'] + [
                 f'--{k}={v}' for k, v in dataclasses.asdict(options).items() if k != 'progress']
  env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get('PYTHONPATH', ''))
  process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  progress_file = os.path.join(out, features.PROGRESS)
  deadline = time.monotonic() + 120
  batches = 0
  while time.monotonic() < deadline and process.poll() is None:
    try:
      with open(progress_file, encoding='utf-8') as f:
        batches = json.load(f)['batches_done']
    except (OSError, ValueError, KeyError):
      batches = 0
    if batches >= 8:
      break
    time.sleep(0.02)
  assert process.poll() is None, process.communicate()[0].decode()[-2000:]
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.exists(os.path.join(out, features.RESULT))
  saved = json.load(open(progress_file, encoding='utf-8'))
  assert 0 < saved['batches_done'] < features_testlib.N_ROWS // 64
  resumed = _arrays(features.compute_statistics(
      tiny_feature_run, out=out, options=options))
  whole64 = _arrays(features.compute_statistics(
      tiny_feature_run, out=str(tmp_path / 'whole64'),
      options=dataclasses.replace(_OPTIONS, batch_size=64)))
  assert resumed.keys() == whole64.keys() and len(resumed) == 17
  for name in resumed:
    np.testing.assert_array_equal(resumed[name], whole64[name], err_msg=name)


def test_bad_input(tiny_feature_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_feature_run, workdir)
  other = features_testlib.write_store(str(tmp_path / 'other'), site='blocks.3.hook_resid_post')
  with pytest.raises(ValueError, match=r"site 'blocks.3.hook_resid_post'; the SAE was trained "
                                       r"on site 'blocks.0.hook_resid_post'"):
    features.open_run(workdir, store=other)
  other_model = features_testlib.write_store(str(tmp_path / 'other_model'), model='another')
  with pytest.raises(ValueError, match="model 'another'"):
    features.open_run(workdir, store=other_model)
  with pytest.raises(FileNotFoundError, match='no activation store at .*nowhere.*--store'):
    features.open_run(workdir, store=str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    features.open_run(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='python -m dictlearn.analysis.features'):
    features.load_statistics(workdir)
  # The run's own store gone: named, with the way out.
  shutil.move(os.path.join(os.path.dirname(tiny_feature_run), 'store'),
              str(tmp_path / 'moved'))
  try:
    with pytest.raises(FileNotFoundError, match=r'store of the run .* is gone.*--store PATH'):
      features.open_run(workdir)
    features.open_run(workdir, store=str(tmp_path / 'moved'))  # the same store, moved: fine
  finally:
    shutil.move(str(tmp_path / 'moved'), os.path.join(os.path.dirname(tiny_feature_run), 'store'))
  # An unfinished pass with other settings is neither resumed nor overwritten.
  out = str(tmp_path / 'f')
  os.makedirs(out)
  progress = {'identity': {'top_n': 99}, 'stage': 'pass', 'batches_done': 3}
  statistics.zarr_io.write_json(os.path.join(out, features.PROGRESS), progress)
  with pytest.raises(ValueError, match='other settings .*top_n: was 99'):
    features.compute_statistics(workdir, out=out, options=_OPTIONS)
  assert statistics.zarr_io.read_json(os.path.join(out, features.PROGRESS)) == progress


def test_feature_index_out_of_range(tiny_feature_run, tmp_path):
  out = features.compute_statistics(tiny_feature_run, out=str(tmp_path / 'f'), options=_OPTIONS)
  written = os.path.getmtime(os.path.join(out, features.RESULT))
  # The same command again: complete for these settings, nothing recomputed.
  assert features.compute_statistics(tiny_feature_run, out=out, options=_OPTIONS) == out
  assert os.path.getmtime(os.path.join(out, features.RESULT)) == written
  stats = features.load_statistics(out)
  for bad in (128, -1, 2.5, 'x'):
    with pytest.raises(statistics.FeatureIndexError, match='128 features|not an integer'):
      stats.feature(bad)
  with pytest.raises(ValueError, match='out of range: this SAE has 128 features, indices 0 to 127'):
    stats.feature(500)
