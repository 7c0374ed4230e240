"""SAELens and sparsify formats: exact round trips, the files field by field, and SAEs
written by the real packages (tests/data, made by tools/check_*_format.py fixtures)."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import numpy as safetensors_np

from dictlearn import evals
from dictlearn.data import store as store_lib
from dictlearn.interop import common
from dictlearn.interop import saelens
from dictlearn.interop import sparsify
from dictlearn.sae import make_sae
from experiments import base

DATA = os.path.join(os.path.dirname(__file__), 'data')
D, N, SITE = 16, 64, 'blocks.1.hook_resid_post'
ARCHITECTURES = ('relu_l1', 'topk', 'batchtopk', 'jumprelu')


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('interop') / 'store')
  writer = store_lib.StoreWriter(path, D, metadata={'model': 'toy', 'site': SITE, 'extra': {
      'bos_id': 1, 'context_length': 32}})
  writer.append(np.random.default_rng(0).standard_normal((2048, D)).astype(np.float32) * 3)
  writer.finish()
  return path


def _config(architecture, store, param_dtype='float32'):
  c = base.get_config()
  c.unlock()
  c.sae.architecture, c.sae.n_latents, c.sae.k, c.sae.aux_k = architecture, N, 4, 8
  c.sae.param_dtype = param_dtype
  c.data.store, c.data.heldout_tokens = store, 512
  c.train.batch_size, c.train.eval_batches = 128, 2
  return c


def _run(tmp_path, architecture, store, *, data_scale=0.37, param_dtype='float32'):
  """A checkpoint with random parameters (no training needed to test a format)."""
  c = _config(architecture, store, param_dtype)
  sae = make_sae(c.sae, D)
  params, buffers = sae.init(jax.random.key(1))
  rng = np.random.default_rng(2)
  params = {k: (np.asarray(v, np.float32) + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in params.items()}
  buffers = {k: np.asarray(0.3 if k == 'threshold' else 0.1, np.float32) for k in buffers}
  snapshot = common.Snapshot(c.to_dict(), {'store': store, 'd_model': D, 'data_scale': data_scale},
                             7, params, buffers)
  workdir = str(tmp_path / architecture)
  common.write_snapshot(snapshot, workdir, where='test')
  return workdir


def _assert_same(a: common.Snapshot, b: common.Snapshot):
  # store_from_workdir is the store relative to each run's own workdir.
  facts = lambda s: {k: v for k, v in s.run_info.items() if k != 'store_from_workdir'}
  assert (a.config, facts(a), a.step, a.store) == (b.config, facts(b), b.step, b.store)
  for part in ('params', 'buffers'):
    x, y = getattr(a, part), getattr(b, part)
    assert sorted(x) == sorted(y)
    for name in x:
      assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
      assert x[name].tobytes() == y[name].tobytes(), f'{part} {name} differs'


@pytest.mark.parametrize('architecture', ARCHITECTURES)
def test_saelens_round_trip_is_exact(tmp_path, store, architecture):
  workdir = _run(tmp_path, architecture, store)
  out = saelens.export(workdir, str(tmp_path / 'sl'))
  saelens.import_saelens(out, str(tmp_path / 'back'))
  _assert_same(common.read_snapshot(workdir), common.read_snapshot(str(tmp_path / 'back')))


def test_round_trips_exact_in_bfloat16_and_through_sparsify(tmp_path, store):
  workdir = _run(tmp_path, 'topk', store, param_dtype='bfloat16', data_scale=1.7)
  saelens.import_saelens(saelens.export(workdir, str(tmp_path / 'sl')), str(tmp_path / 'a'))
  _assert_same(common.read_snapshot(workdir), common.read_snapshot(str(tmp_path / 'a')))
  assert sparsify.main(['export', '--workdir', workdir, '--out', str(tmp_path / 'sp')]) == 0
  assert sparsify.main(['import', str(tmp_path / 'sp'), '--workdir', str(tmp_path / 'b')]) == 0
  _assert_same(common.read_snapshot(workdir), common.read_snapshot(str(tmp_path / 'b')))


def _types(d):
  return {k: type(v).__name__ for k, v in d.items()}


@pytest.mark.parametrize('architecture,reference', [
    ('relu_l1', 'standard'), ('topk', 'topk'), ('jumprelu', 'jumprelu'),
    ('batchtopk', 'batchtopk')])
def test_saelens_export_follows_the_format_field_by_field(tmp_path, store, architecture,
                                                           reference):
  """Against the files sae_lens 6.54.12 itself saved (save_model / save_inference_model)."""
  out = saelens.export(_run(tmp_path, architecture, store), str(tmp_path / 'sl'))
  with open(os.path.join(out, 'cfg.json')) as f:
    ours = json.load(f)
  with open(os.path.join(DATA, 'saelens', reference, 'cfg.json')) as f:
    theirs = json.load(f)
  assert _types(ours) == _types(theirs)
  assert ours['architecture'] == theirs['architecture']
  assert (ours['d_in'], ours['d_sae'], ours['dtype'], ours['normalize_activations']) == (
      D, N, 'float32', 'none')
  assert ours['apply_b_dec_to_input'] == (architecture in ('topk', 'batchtopk'))
  shared = set(theirs['metadata']) - {'training_architecture_details'}
  assert shared <= set(ours['metadata'])
  for key in shared - {'sae_lens_training_version'}:  # None: not trained by sae_lens
    assert type(ours['metadata'][key]) is type(theirs['metadata'][key]), key
  assert ours['metadata']['hook_name'] == SITE and ours['metadata']['model_name'] == 'toy'
  ref = safetensors_np.load_file(os.path.join(DATA, 'saelens', reference,
                                              'sae_weights.safetensors'))
  got = safetensors_np.load_file(os.path.join(out, 'sae_weights.safetensors'))
  scale = lambda shape: tuple(N if s == 16 else D if s == 8 else s for s in shape)
  assert {k: (scale(v.shape), v.dtype) for k, v in ref.items()} == {
      k: (v.shape, v.dtype) for k, v in got.items()}


def _reconstruct(workdir, x):
  snap = common.read_snapshot(workdir)
  sae = make_sae(ml_collections.ConfigDict(snap.config['sae']), snap.run_info['d_model'])
  scale = snap.run_info['data_scale']
  params, buffers = jax.tree.map(jnp.asarray, (snap.params, snap.buffers))
  codes = np.asarray(sae.encode(params, buffers, x * scale))
  return np.asarray(sae.reconstruct(params, buffers, x * scale)) / scale, codes, snap


@pytest.mark.parametrize('name,architecture', [
    ('standard', 'relu_l1'), ('topk', 'topk'), ('topk_rescaled', 'topk'),
    ('jumprelu', 'jumprelu'), ('batchtopk', 'batchtopk'), ('layers.1', 'topk')])
def test_import_of_saes_the_peers_wrote(tmp_path, name, architecture):
  """Reconstructions and active latents equal those sae_lens / sparsify computed."""
  library = 'sparsify' if name == 'layers.1' else 'saelens'
  directory = os.path.join(DATA, library, name)
  workdir = str(tmp_path / 'run')
  if library == 'sparsify':
    sparsify.import_sparsify(directory, workdir, base_config=base.get_config())
  else:
    saelens.import_saelens(directory, workdir, base_config=base.get_config())
  x = np.load(os.path.join(directory, 'inputs.npy'))
  got, codes, snap = _reconstruct(workdir, x)
  assert snap.architecture == architecture
  assert snap.run_info == {'store': None, 'd_model': 8, 'data_scale': 1.0, 'site': SITE,
                           'model': None if library == 'sparsify' else 'toy'}
  np.testing.assert_allclose(got, np.load(os.path.join(directory, 'reconstructions.npy')),
                             rtol=1e-5, atol=1e-5)
  want_codes = np.load(os.path.join(directory, 'codes.npy'))
  np.testing.assert_array_equal(codes > 0, want_codes > 0)
  np.testing.assert_allclose(codes, want_codes, rtol=1e-5, atol=1e-5)


def test_attached_store_evaluates_like_the_original(tmp_path, store):
  workdir = _run(tmp_path, 'topk', store)
  out = saelens.export(workdir, str(tmp_path / 'sl'))
  # As an SAE from elsewhere: no dictlearn block, so no store either.
  with open(os.path.join(out, 'cfg.json')) as f:
    cfg = json.load(f)
  del cfg['metadata']['dictlearn']
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'cfg.json').write_text(json.dumps(cfg))
  os.link(os.path.join(out, 'sae_weights.safetensors'), foreign / 'sae_weights.safetensors')
  saelens.import_saelens(str(foreign), str(tmp_path / 'bare'), base_config=_config('topk', ''))
  with pytest.raises(ValueError, match='has no activation store.*--store PATH'):
    evals.evaluate_checkpoint(str(tmp_path / 'bare'), ce_contexts=0)
  saelens.import_saelens(str(foreign), str(tmp_path / 'attached'), store=store,
                         base_config=_config('topk', ''))
  want = evals.evaluate_checkpoint(workdir, ce_contexts=0)
  got = evals.evaluate_checkpoint(str(tmp_path / 'attached'), ce_contexts=0)
  assert got['rows'] == want['rows'] and got['l0'] == want['l0']
  assert abs(got['fvu'] - want['fvu']) < 1e-5 * want['fvu']


def test_bad_input_is_refused_by_name_and_nothing_is_lost(tmp_path, store, capsys):
  workdir = _run(tmp_path, 'jumprelu', store)
  out = saelens.export(workdir, str(tmp_path / 'sl'))
  with pytest.raises(FileExistsError, match='already exists'):
    saelens.export(workdir, out)
  with pytest.raises(FileExistsError, match='already exists'):
    saelens.import_saelens(out, workdir)
  with pytest.raises(ValueError, match="sparsify holds TopK SAEs only; this checkpoint is 'jumprelu'"):
    sparsify.export(workdir, str(tmp_path / 'sp'))
  assert not os.path.exists(tmp_path / 'sp')
  with pytest.raises(ValueError, match="site 'blocks.1.hook_resid_post', the SAE reads 'x'"):
    common.check_store(store, site='x', d_model=D)

  def edited(name, edit, file='cfg.json'):
    path = tmp_path / name
    path.mkdir()
    for f in os.listdir(out):
      os.link(os.path.join(out, f), path / f)
    if file == 'cfg.json':
      cfg = json.loads((path / file).read_text())
      edit(cfg)
      (path / file).unlink()
      (path / file).write_text(json.dumps(cfg))
    else:
      (path / file).unlink()
    return str(path)

  cases = [
      (edited('v7', lambda c: c['metadata'].update(sae_lens_version='7.0.0')),
       'written by sae-lens 7.0.0; this reader follows the 6.x format'),
      (edited('arch', lambda c: c.update(architecture='gated')),
       "architecture 'gated' has no dictlearn counterpart; expected one of"),
      (edited('block', lambda c: c['metadata']['dictlearn'].update(format_version=99)),
       'format_version=99; this dictlearn reads format_version 1'),
      (edited('shape', lambda c: c.update(d_sae=N + 1)),
       rf'W_enc has shape \({D}, {N}\), expected \({D}, {N + 1}\)'),
      (edited('missing', None, file='sae_weights.safetensors'),
       'not a SAELens SAE directory: missing .*sae_weights.safetensors'),
  ]
  for directory, message in cases:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      saelens.import_saelens(directory, str(tmp_path / 'never'))
  assert not os.path.exists(tmp_path / 'never' / 'checkpoints')
  assert saelens.main(['import', cases[0][0], '--workdir', str(tmp_path / 'never')]) == 1
  assert capsys.readouterr().err.strip().endswith('this reader follows the 6.x format '
                                                  '(sae-lens 6.54.12)')


def test_pre_6_config_and_a_norm_scaling_factor(tmp_path):
  """A sae-lens < 6 cfg.json (top-level hook_point, TopK through activation_fn_kwargs,
  normalize_activations true) reads as SAELens reads it; the release's factor becomes
  the run's data_scale."""
  directory = os.path.join(DATA, 'saelens', 'topk')
  with open(os.path.join(directory, 'cfg.json')) as f:
    cfg = json.load(f)
  old = tmp_path / 'old'
  old.mkdir()
  (old / 'cfg.json').write_text(json.dumps({
      'd_in': cfg['d_in'], 'd_sae': cfg['d_sae'], 'dtype': 'torch.float32', 'device': 'cpu',
      'model_name': 'toy', 'hook_point': SITE, 'hook_point_head_index': None,
      'activation_fn_str': 'topk', 'activation_fn_kwargs': {'k': cfg['k']},
      'normalize_activations': True}))
  os.link(os.path.join(directory, 'sae_weights.safetensors'), old / 'sae_weights.safetensors')
  with pytest.raises(ValueError, match='pass --norm_scaling_factor'):
    saelens.import_saelens(str(old), str(tmp_path / 'a'), base_config=base.get_config())
  saelens.import_saelens(str(old), str(tmp_path / 'b'), base_config=base.get_config(),
                         norm_scaling_factor=2.5)
  x = np.load(os.path.join(directory, 'inputs.npy'))
  got, _, snap = _reconstruct(str(tmp_path / 'b'), x / 2.5)  # the SAE reads x * 2.5
  assert (snap.architecture, snap.config['sae']['k'], snap.run_info['data_scale'],
          snap.run_info['site']) == ('topk', cfg['k'], 2.5, SITE)
  np.testing.assert_allclose(got * 2.5, np.load(os.path.join(directory, 'reconstructions.npy')),
                             rtol=1e-5, atol=1e-5)
