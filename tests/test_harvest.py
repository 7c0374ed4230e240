"""Harvest: stores match a direct forward pass, resume after SIGKILL or errors, bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dictlearn import harvest as harvest_lib
from dictlearn.data import corpus as corpus_lib
from dictlearn.data import store
from dictlearn.lm import llama
from experiments import harvest_smollm2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = ('blocks.0.hook_resid_post', 'blocks.1.hook_mlp_out')
# The resume tests: long enough (about 10 shards of 128 rows) that a kill lands mid-way.
RESUME = {'token_budget': 5000, 'sites': ('blocks.0.hook_resid_post', 'blocks.2.hook_resid_post')}


def _config(**overrides):
  c = harvest_smollm2.get_config('tiny')
  with c.unlocked():
    c.update(overrides)
  return c


def _read_store(path):
  r = store.StoreReader(path)
  return {'x': r.read_rows(0, r.n_rows), 'tokens': r.read_tokens(0, r.n_rows),
          'doc': r.read_doc(0, r.n_rows), 'pos': r.read_pos(0, r.n_rows), 'manifest': r.manifest}


def _assert_same_stores(out_a, out_b, sites):
  for site in sites:
    a, b = _read_store(f'{out_a}/{site}'), _read_store(f'{out_b}/{site}')
    for key in ('tokens', 'doc', 'pos'):
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{site} {key}')
    np.testing.assert_allclose(a['x'], b['x'], rtol=1e-5, atol=1e-5, err_msg=site)
    assert a['manifest']['statistics']['count'] == b['manifest']['statistics']['count']


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def test_two_sites_match_direct_forward(tmp_path, smollm2):
  cfg_lm, params, tokenizer = smollm2
  config = _config(sites=SITES)
  summary = harvest_lib.harvest(config, tmp_path, model=smollm2)
  assert summary['n_tokens'] == 2000 and not summary['corpus_exhausted']
  a, b = (_read_store(f'{tmp_path}/{s}') for s in SITES)
  for key in ('tokens', 'doc', 'pos'):
    np.testing.assert_array_equal(a[key], b[key])
  assert (a['pos'] >= 0).all()  # BOS rows excluded
  # Every row is the token at (doc, pos) of the tokenized corpus.
  docs = {d.index: d.text for d in corpus_lib.Corpus('builtin').documents() if d.index < 4}
  ids = {i: tokenizer.encode(t) for i, t in docs.items()}
  assert [ids[d][p] for d, p in zip(a['doc'], a['pos'])] == a['tokens'].tolist()
  # Activations equal a direct forward over the same contexts.
  contexts = list(corpus_lib.pack_contexts(corpus_lib.Corpus('builtin'), tokenizer.encode_batch,
                                           tokenizer.bos_id, 64))[:8]
  tokens = np.stack([c.tokens for c in contexts])
  _, acts = llama.forward(params, cfg_lm, tokens, read_sites=SITES, return_logits=False)
  mask = np.concatenate([c.row_mask(True) for c in contexts])
  for site, stored in zip(SITES, (a, b)):
    direct = np.asarray(acts[site]).reshape(-1, cfg_lm.d_model)[mask]
    np.testing.assert_allclose(stored['x'][:len(direct)], direct, rtol=1e-5, atol=1e-5)
  manifest = a['manifest']
  assert manifest['site'] == SITES[0] and manifest['n_tokens'] == 2000
  assert manifest['model'] == 'SmolLM2-135M-Instruct.Q4_1.gguf'
  assert manifest['corpus']['spec'] == 'builtin'
  extra = manifest['extra']
  assert extra['context_length'] == 64 and extra['exclude_bos'] and extra['bos_id'] == 1
  assert extra['model']['bytes'] > 0 and len(extra['model']['sha256']) == 64
  assert extra['harvest']['sites'] == list(SITES)
  assert manifest['statistics']['count'] == 2000
  # A rerun of a finished harvest changes nothing.
  before = _snapshot(tmp_path)
  assert harvest_lib.harvest(config, tmp_path, model=smollm2) == summary
  assert _snapshot(tmp_path) == before


def test_bos_rows_kept_on_request_are_outliers(tmp_path, smollm2):
  config = _config(sites=('blocks.1.hook_resid_post',), exclude_bos=False, token_budget=512)
  harvest_lib.harvest(config, tmp_path, model=smollm2)
  s = _read_store(f'{tmp_path}/blocks.1.hook_resid_post')
  bos = s['pos'] == -1
  assert bos.sum() >= 512 // 64 and (s['tokens'][bos] == 1).all()
  # The BOS starting a context is the outlier (about 5x the median norm at block 1,
  # growing with depth); a BOS separator inside a context less so.
  norms = np.linalg.norm(s['x'], axis=1)
  assert np.median(norms[bos]) > 4 * np.median(norms[~bos])


@pytest.fixture(scope='module')
def reference(tmp_path_factory, smollm2):
  out = tmp_path_factory.mktemp('reference')
  harvest_lib.harvest(_config(**RESUME), out, model=smollm2)
  return out


@pytest.mark.slow  # about 20-30 s: the subprocess loads the model and compiles
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, smollm2, reference):
  flags = [f'--config.token_budget={RESUME["token_budget"]}',
           f'--config.sites={RESUME["sites"]!r}']
  cmd = [sys.executable, '-m', 'dictlearn.harvest', '--config',
         'experiments/harvest_smollm2.py:tiny', '--out', str(tmp_path)] + flags
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  progress = tmp_path / RESUME['sites'][1] / 'progress.json'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if progress.exists() and json.loads(progress.read_text())['n_rows'] > 0:
      break
    time.sleep(0.02)
  assert proc.poll() is None, f'harvest ended before it could be killed: {proc.stderr.read()}'
  time.sleep(random.Random().uniform(0, 0.5))  # a random moment after the first commit
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  record = json.loads((tmp_path / 'harvest.json').read_text())
  assert not record['complete'], 'the kill came after the harvest had finished'
  committed = [store.read_status(f'{tmp_path}/{s}')[1] for s in RESUME['sites']]
  assert all(p is not None and p['n_rows'] < RESUME['token_budget'] for p in committed)
  summary = harvest_lib.harvest(_config(**RESUME), tmp_path, model=smollm2)
  assert summary['n_tokens'] == RESUME['token_budget']
  _assert_same_stores(reference, tmp_path, RESUME['sites'])


def test_error_mid_harvest_then_bad_reruns_then_resume(tmp_path, smollm2, reference, monkeypatch):
  # Stop the harvest inside the second site's append (the first site has the
  # batch, the second not): the sites stop at different rows.
  calls = {'n': 0}
  original = store.StoreWriter.append

  def failing_append(self, *args, **kwargs):
    if self.path.endswith(RESUME['sites'][1]):
      calls['n'] += 1
      if calls['n'] == 7:
        raise OSError('disk full (injected)')
    return original(self, *args, **kwargs)

  monkeypatch.setattr(store.StoreWriter, 'append', failing_append)
  with pytest.raises(OSError, match='injected'):
    harvest_lib.harvest(_config(**RESUME), tmp_path, model=smollm2)
  monkeypatch.setattr(store.StoreWriter, 'append', original)
  rows = [store.read_status(f'{tmp_path}/{s}')[1]['n_rows'] for s in RESUME['sites']]
  assert 0 < rows[1] < rows[0] < RESUME['token_budget']

  # Bad reruns fail with clear messages and leave the data as it was.
  before = _snapshot(tmp_path)
  bad = [
      ({'sites': ('blocks.0.hook_resid_post', 'blocks.99.hook_resid_post')},
       ValueError, r"Unknown hook site 'blocks.99.hook_resid_post'.*blocks.29.hook_resid_post"),
      ({'context_length': 9000}, ValueError, r'context_length must be in \[2, 8192\]'),
      ({'model': str(tmp_path / 'missing.gguf')}, FileNotFoundError, 'missing.gguf'),
      ({'corpus': str(tmp_path / 'nothing.txt')}, corpus_lib.CorpusError, 'no such file'),
      ({'token_budget': 6000}, ValueError, r'different config: token_budget: was 5000, now 6000'),
  ]
  for overrides, error, message in bad:
    with pytest.raises(error, match=message):
      harvest_lib.harvest(_config(**dict(RESUME, **overrides)), tmp_path,
                          model=None if 'model' in overrides else smollm2)
  assert _snapshot(tmp_path) == before

  harvest_lib.harvest(_config(**dict(RESUME, batch_size=3)), tmp_path, model=smollm2)
  _assert_same_stores(reference, tmp_path, RESUME['sites'])


def test_stop_between_store_finishes_resumes(tmp_path, smollm2, monkeypatch):
  config = _config(sites=SITES, token_budget=600)
  original = store.StoreWriter.finish

  def interrupted_finish(self):
    if self.path.endswith(SITES[1]):
      raise KeyboardInterrupt  # stopped after the first store was sealed
    return original(self)

  monkeypatch.setattr(store.StoreWriter, 'finish', interrupted_finish)
  with pytest.raises(KeyboardInterrupt):
    harvest_lib.harvest(config, tmp_path, model=smollm2)
  monkeypatch.setattr(store.StoreWriter, 'finish', original)
  assert [store.read_status(f'{tmp_path}/{s}')[0] is not None for s in SITES] == [True, False]
  assert harvest_lib.harvest(config, tmp_path, model=smollm2)['n_tokens'] == 600
  a, b = (_read_store(f'{tmp_path}/{s}') for s in SITES)
  assert a['manifest']['n_tokens'] == b['manifest']['n_tokens'] == 600
  np.testing.assert_array_equal(a['tokens'], b['tokens'])


def test_bad_corpus_file_mid_harvest_keeps_rows_and_resumes(tmp_path, smollm2):
  data = tmp_path / 'data'
  data.mkdir()
  text = ''.join(d.text for d in corpus_lib.Corpus('builtin').documents())[:6000]
  (data / 'a.txt').write_text(text)
  (data / 'b.txt').write_bytes(b'ok so far \xff then bad')
  config = _config(corpus=str(data), sites=('blocks.0.hook_resid_post',), token_budget=3000)
  with pytest.raises(corpus_lib.CorpusError, match=r'b\.txt: not UTF-8 text: .* byte offset 10'):
    harvest_lib.harvest(config, tmp_path / 'out', model=smollm2)
  kept = store.read_status(f'{tmp_path}/out/blocks.0.hook_resid_post')[1]['n_rows']
  assert kept > 0  # the contexts of a.txt were written
  (data / 'b.txt').write_text('ok so far, and now fixed. ' * 400)
  summary = harvest_lib.harvest(config, tmp_path / 'out', model=smollm2)
  harvest_lib.harvest(config, tmp_path / 'fresh', model=smollm2)
  assert summary['n_tokens'] == 3000
  _assert_same_stores(tmp_path / 'fresh', tmp_path / 'out', config.sites)


def test_empty_corpus_and_context_length_checked_before_writing(tmp_path, smollm2):
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(corpus_lib.CorpusError, match='is empty'):
    harvest_lib.harvest(_config(corpus=str(tmp_path / 'empty.txt')), tmp_path / 'out',
                        model=smollm2)
  with pytest.raises(ValueError, match='lists a site twice'):
    harvest_lib.harvest(_config(sites=SITES[:1] * 2), tmp_path / 'out', model=smollm2)
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow  # about 30 s: compiles the generation loop
def test_generated_corpus_is_generated_once_and_harvested(tmp_path, smollm2):
  _, _, tokenizer = smollm2
  config = _config(corpus='generated', token_budget=-1, sites=('blocks.0.hook_resid_post',))
  with config.unlocked():
    config.generate.update(n_prompts=3, max_new_tokens=12, batch_size=2,
                           cache_dir=str(tmp_path / 'cache'))
  summary = harvest_lib.harvest(config, tmp_path / 'a', model=smollm2)
  (cache,) = (tmp_path / 'cache').iterdir()
  replies = [json.loads(line) for line in cache.read_text().splitlines()]
  assert [r['prompt'] for r in replies] == list(corpus_lib.GENERATION_PROMPTS[:3])
  n_tokens = sum(len(tokenizer.encode(r['text'])) for r in replies)
  assert 0 < n_tokens <= 36 and summary['n_tokens'] == n_tokens and summary['corpus_exhausted']
  mtime = cache.stat().st_mtime_ns
  assert harvest_lib.harvest(config, tmp_path / 'b', model=smollm2)['n_tokens'] == n_tokens
  assert cache.stat().st_mtime_ns == mtime  # read from the cache, not generated again
