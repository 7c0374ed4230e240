"""Tests of dictlearn.analysis.steering: each intervention's exact property on SmolLM2.

Every test here shares a few compiled programs: short prompts, one hooked site
per test where possible, values swept as traced arguments.
"""
import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.analysis import steering
from dictlearn.analysis import vectors_io
from dictlearn.lm import generate as gen
from dictlearn.lm import llama
from experiments import tiny

SITE = 'blocks.12.hook_resid_post'
TRACES = collections.Counter()


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=['site'])
@dataclasses.dataclass(frozen=True)
class TraceCounter(llama.Patch):
  """Counts how often the program holding it is traced (its body runs only then)."""
  site: str

  def __call__(self, x, tokens):
    TRACES[self.site] += 1
    return x


@pytest.fixture(scope='module')
def tokens(smollm2):
  _, _, tok = smollm2
  return jnp.asarray([tok.encode('The weather today is sunny and I feel')], jnp.int32)


@pytest.fixture(scope='module')
def baseline(smollm2, tokens):
  cfg, params, _ = smollm2
  return llama.forward(params, cfg, tokens, read_sites=[SITE])


@pytest.fixture(scope='module')
def random_sae(smollm2, small_topk_sae):
  """A TopK SAE of 256 latents at SITE, encoder perturbed so that W_enc[:, i] . W_dec[i] != 1."""
  cfg, _, _ = smollm2
  sae, params, buffers = small_topk_sae
  noise = 0.02 * jax.random.normal(jax.random.PRNGKey(1), params['W_enc'].shape)
  params = dict(params, W_enc=params['W_enc'] * 0.8 + noise)
  return steering.SaeAtSite(sae, SITE, cfg.name, steering.NO_TOKEN, params, buffers,
                            jnp.float32(0.135))


def _unit(seed, d):
  v = np.random.default_rng(seed).normal(size=d).astype(np.float32)
  return v / np.linalg.norm(v)


def test_zero_strength_is_bitwise_and_a_sweep_compiles_once(smollm2, tokens, baseline,
                                                             random_sae):
  cfg, params, _ = smollm2
  plain_logits, _ = baseline
  v, u = 50 * _unit(0, cfg.d_model), _unit(1, cfg.d_model)

  def run(c, off=False):
    interventions = [
        steering.add('blocks.3.hook_resid_post', v, c),
        steering.add_feature(random_sae, 7, 10 * c),
        steering.ablate('blocks.20.hook_mlp_out', u, c),
        steering.cap('blocks.20.hook_resid_post', u, -1.0, 1.0),
    ]
    if off:
      interventions = steering.switched_off(interventions)
    interventions.append(TraceCounter('blocks.20.hook_resid_post'))
    return llama.forward(params, cfg, tokens, interventions=interventions)[0]

  TRACES.clear()
  np.testing.assert_array_equal(np.asarray(run(2.0, off=True)), np.asarray(plain_logits))
  shifts = [float(jnp.max(jnp.abs(run(c) - plain_logits))) for c in (0.5, 1.0, 2.0)]
  assert TRACES['blocks.20.hook_resid_post'] == 1  # four runs, one compiled program
  assert 0 < shifts[0] < shifts[1] < shifts[2]
  # Zero strengths and a band holding every projection: the unpatched model, bit for bit.
  zero = llama.forward(params, cfg, tokens, interventions=[
      steering.add('blocks.3.hook_resid_post', v, 0.0),
      steering.add_feature(random_sae, 7, 0.0),
      steering.ablate('blocks.20.hook_mlp_out', u, 0.0),
      steering.cap('blocks.20.hook_resid_post', u), TraceCounter('blocks.20.hook_resid_post')])[0]
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain_logits))
  assert TRACES['blocks.20.hook_resid_post'] == 1


def test_clamp_sets_the_feature_in_the_sae_decomposition(smollm2, tokens, baseline, random_sae):
  cfg, params, _ = smollm2
  x = baseline[1][SITE][0]  # (seq, d) clean activations at the SAE's site
  sae, s = random_sae, random_sae.data_scale
  f = np.asarray(sae.encode(x))
  feature = int(np.argmax(f[3]))  # active at position 3
  values = jnp.asarray([5.0 * f[3, feature], 0.0])
  features = jnp.asarray([feature, int(np.argsort(f[5])[-2])])  # the second, clamped to zero
  skip = int(tokens[0, 0])
  where = steering.span('all', skip_token=skip)
  _, acts = llama.forward(params, cfg, tokens, read_sites=[SITE],
                          interventions=[steering.clamp(sae, features, values, where)])
  patched = acts[SITE][0]
  # The SAE's reading of the patched activation: the same error term, the clamped code.
  error = x * s - sae.sae.reconstruct(sae.params, sae.buffers, x * s)
  clamped = f.copy()
  clamped[:, np.asarray(features)] = np.asarray(values)
  expected = (sae.sae.decode(sae.params, jnp.asarray(clamped)) + error) / s
  np.testing.assert_allclose(np.asarray(patched[1:]), np.asarray(expected[1:]), rtol=1e-4,
                             atol=1e-3 * float(jnp.max(jnp.abs(x))))
  np.testing.assert_array_equal(np.asarray(patched[0]), np.asarray(x[0]))  # skip_token left alone
  # Re-encoding moves the feature by (value - f) * (W_enc[:, i] . W_dec[i]), not all the way:
  # the decoder and encoder of an SAE are not inverse to each other.
  diag = float(sae.params['W_enc'][:, feature] @ sae.params['W_dec'][feature])
  again = np.asarray(sae.encode(patched))
  moved = f[3, feature] + (values[0] - f[3, feature]) * diag
  assert abs(diag - 1) > 0.1
  np.testing.assert_allclose(again[3, feature], moved, rtol=1e-3)


def test_cap_keeps_the_projection_in_the_band(smollm2, tokens, baseline):
  cfg, params, _ = smollm2
  x = np.asarray(baseline[1][SITE][0])
  u = _unit(2, cfg.d_model)
  projection = x @ u
  lo, hi = np.quantile(projection[1:], [0.3, 0.7])
  _, acts = llama.forward(params, cfg, tokens, read_sites=[SITE],
                          interventions=[steering.cap(SITE, u, lo, hi)])
  capped = np.asarray(acts[SITE][0])
  tol = 1e-5 * np.abs(projection).max()
  assert np.all(capped @ u >= lo - tol) and np.all(capped @ u <= hi + tol)
  inside = (projection >= lo) & (projection <= hi)
  assert 0 < inside.sum() < len(inside)
  np.testing.assert_array_equal(capped[inside], x[inside])  # already in the band: untouched
  # Only the component along u moves.
  rest = lambda a: a - np.outer(a @ u, u)
  np.testing.assert_allclose(rest(capped), rest(x), atol=1e-4 * np.abs(x).max())


def test_ablate_removes_the_direction(smollm2, tokens, baseline):
  cfg, params, _ = smollm2
  x = np.asarray(baseline[1][SITE][0])
  u = x[1:].mean(0) / np.linalg.norm(x[1:].mean(0))
  _, acts = llama.forward(params, cfg, tokens, read_sites=[SITE],
                          interventions=[steering.ablate(SITE, u)])
  np.testing.assert_allclose(np.asarray(acts[SITE][0]) @ u, 0, atol=1e-5 * np.abs(x).max())


def test_spans_in_forward(smollm2, tokens, baseline):
  cfg, params, _ = smollm2
  v1, v2 = _unit(3, cfg.d_model), _unit(4, cfg.d_model)
  interventions = [steering.add(SITE, v1, 2.0, steering.span('prompt')),
                   steering.add(SITE, v2, 3.0, steering.span('generated')),
                   steering.add(SITE, np.stack([v1, v2]), 1.0, steering.front(2, start=5))]
  _, acts = llama.forward(params, cfg, tokens, read_sites=[SITE], interventions=interventions,
                          prompt_lengths=jnp.asarray([4]))
  delta = np.asarray(acts[SITE][0] - baseline[1][SITE][0])
  expected = np.zeros_like(delta)
  expected[:4] += 2 * v1
  expected[4:] += 3 * v2
  expected[5] += v1
  expected[6] += v2
  # (x + a) - x is a to within float32 rounding at x's magnitude.
  np.testing.assert_allclose(delta, expected, atol=1e-6 * float(jnp.max(jnp.abs(acts[SITE]))))


def test_per_row_vectors_and_coefficients(smollm2, tokens, baseline):
  cfg, params, _ = smollm2
  v1, v2 = _unit(5, cfg.d_model), _unit(6, cfg.d_model)
  two = jnp.concatenate([tokens, tokens])
  interventions = [steering.add(SITE, np.stack([v1, v2]), 2.0, per_row=True),
                   steering.add(SITE, v1, jnp.asarray([1.0, 0.0]))]
  _, acts = llama.forward(params, cfg, two, read_sites=[SITE], interventions=interventions)
  delta = np.asarray(acts[SITE] - baseline[1][SITE])
  tol = 1e-5 * float(jnp.max(jnp.abs(acts[SITE])))
  np.testing.assert_allclose(delta[0], np.broadcast_to(3 * v1, delta[0].shape), atol=tol)
  np.testing.assert_allclose(delta[1], np.broadcast_to(2 * v2, delta[1].shape), atol=tol)
  with pytest.raises(ValueError, match='per-row vector.*3 rows; the batch has 2'):
    llama.forward(params, cfg, two, interventions=[
        steering.add(SITE, np.ones((3, cfg.d_model)), per_row=True)])


def test_positions_honoured_in_generation(smollm2):
  cfg, params, tok = smollm2
  prompt = tok.encode('My favourite city is')
  p, steps = len(prompt), 6
  berlin = 400.0 * params['embed'][tok.encode(' Berlin')[0]]
  kw = dict(max_new_tokens=steps, eos_id=None, prompt_bucket=1)
  plain = gen.generate(params, cfg, [prompt], **kw)[0]
  TRACES.clear()
  outs = {}
  # The token generated at index j comes from position p - 1 + j: a window from p + 2 leaves the
  # first three generated tokens alone; a window over the prompt's front changes what follows.
  for name, start, stop in (('late', p + 2, p + 4), ('front', 0, 3), ('off', 0, 3)):
    where = steering.span('all', start=start, stop=stop)
    coefficient = 0.0 if name == 'off' else 1.0
    interventions = [steering.add('blocks.6.hook_resid_post', berlin, coefficient, where),
                     TraceCounter('blocks.6.hook_resid_post')]
    outs[name] = gen.generate(params, cfg, [prompt], interventions=interventions, **kw)[0]
    # The cached generation sees the same positions as a forward over prompt + completion.
    seq = jnp.asarray([prompt + outs[name]])
    logits, _ = llama.forward(params, cfg, seq, interventions=interventions[:1],
                              prompt_lengths=jnp.asarray([p]))
    assert np.asarray(jnp.argmax(logits[0, p - 1:-1], -1)).tolist() == outs[name]
  # One generation program (traced in its prefill and its decoding step), reused for every window.
  assert TRACES['blocks.6.hook_resid_post'] == 2
  assert outs['off'] == plain
  assert outs['late'][:3] == plain[:3] and outs['late'] != plain
  assert outs['front'] != plain


# ---- bad input ---------------------------------------------------------------------------


def test_bad_input_is_named(smollm2, tokens, random_sae):
  cfg, params, _ = smollm2
  with pytest.raises(ValueError, match='Unknown hook site'):
    llama.forward(params, cfg, tokens,
                  interventions=[steering.add('blocks.12.hook_resid', np.zeros(cfg.d_model))])
  with pytest.raises(ValueError, match=r'shape \(512,\).*d_model = 576'):
    llama.forward(params, cfg, tokens, interventions=[steering.add(SITE, np.ones(512))])
  with pytest.raises(ValueError, match=r'feature index \[256\] out of range.*256 latents'):
    steering.clamp(random_sae, 256, 1.0)
  with pytest.raises(ValueError, match='out of range'):
    steering.add_feature(random_sae, -1, 1.0)
  with pytest.raises(ValueError, match='lo <= hi'):
    steering.cap(SITE, np.ones(cfg.d_model), 2.0, 1.0)
  with pytest.raises(ValueError, match='non-zero'):
    steering.ablate(SITE, np.zeros(cfg.d_model))
  with pytest.raises(ValueError, match='span kind'):
    steering.span('decoded')
  with pytest.raises(TypeError, match='must be a dictlearn.lm.llama.Patch'):
    llama.forward(params, cfg, tokens, interventions=[lambda x, t: x])
  other = dataclasses.replace(cfg, name='another model')
  with pytest.raises(ValueError, match="trained on 'Smollm2"):
    llama.forward(params, other, tokens, interventions=[steering.clamp(random_sae, 0, 1.0)])


def test_vector_file_round_trip_and_refusals(tmp_path, smollm2):
  cfg, _, _ = smollm2
  identity = vectors_io.model_identity(cfg)
  path = str(tmp_path / 'love.safetensors')
  vectors = {'love': np.arange(576, dtype=np.float32), 'actadd': np.ones((3, 576))}
  vectors_io.save_vectors(path, vectors, site=SITE, model=identity,
                          provenance={'method': 'test'})
  saved = vectors_io.load_vectors(path, model=identity)
  assert saved.site == SITE and saved.provenance == {'method': 'test'}
  np.testing.assert_array_equal(saved.vectors['love'], vectors['love'])
  assert saved.vectors['actadd'].shape == (3, 576)
  other = vectors_io.model_identity(dataclasses.replace(cfg, name='Other-1B', d_model=2048))
  with pytest.raises(ValueError, match=r"another model: its name is 'Smollm2.*'Other-1B'"):
    vectors_io.load_vectors(path, model=other)
  with pytest.raises(ValueError, match=r'shape \(3, 512\).*d_model = 576'):
    vectors_io.save_vectors(path, {'x': np.ones((3, 512))}, site=SITE, model=identity,
                            provenance={})
  with pytest.raises(ValueError, match='Unknown hook site'):
    vectors_io.save_vectors(path, vectors, site='blocks.99.hook_resid_post', model=identity,
                            provenance={})
  not_ours = tmp_path / 'x.safetensors'
  not_ours.write_bytes(b'garbage')
  with pytest.raises(ValueError, match='not a safetensors file'):
    vectors_io.load_vectors(str(not_ours))


# ---- the command line ----------------------------------------------------------------------


def _write_sae_run(workdir, sae_at_site):
  """A training workdir holding one checkpoint of `sae_at_site`, beside a small store at SITE."""
  from dictlearn.data import store as store_lib
  from dictlearn.train import checkpoint as ckpt_lib
  store = str(workdir / 'store')
  writer = store_lib.StoreWriter(store, 576, chunk_rows=64, shard_chunks=1,
                                 metadata={'model': 'SmolLM2', 'site': SITE})
  writer.append(np.random.default_rng(0).normal(size=(64, 576)).astype(np.float32))
  writer.finish()
  config = tiny.get_config('topk').to_dict()
  config['sae'].update(n_latents=sae_at_site.n_latents, k=8)
  run = str(workdir / 'sae')
  manager = ckpt_lib.make_manager(ckpt_lib.checkpoint_dir(run), async_save=False)
  state = {'params': sae_at_site.params, 'buffers': sae_at_site.buffers}
  ckpt_lib.save(manager, 1, state, config, ckpt_lib.run_record(
      store, run, d_model=576, data_scale=float(sae_at_site.data_scale)))
  manager.wait_until_finished()
  manager.close()
  return run


def test_steer_command_feature_and_vector_side_by_side(tmp_path, capsys, smollm2, random_sae):
  from dictlearn.analysis import steer
  cfg, params, _ = smollm2
  run = _write_sae_run(tmp_path, random_sae)
  vector = str(tmp_path / 'berlin.safetensors')
  vectors_io.save_vectors(vector, {'berlin': 400.0 * params['embed'][11452]},
                          site='blocks.6.hook_resid_post', model=vectors_io.model_identity(cfg),
                          provenance={'method': 'embedding of a token'})
  common = ['--prompt', 'My favourite city is', '--raw', '--max_new_tokens', '4']
  assert steer.main(['--workdir', run, '--feature', '7', '--value', '3', '--vector', vector,
                     '--coefficient', '1'] + common, model=smollm2) == 0
  out = capsys.readouterr().out
  assert 'clamp feature(s) [7] to [3.0] at blocks.12.hook_resid_post' in out
  assert 'baseline (greedy)' in out and 'steered (sampled, T=0.8, seed 0)' in out
  # Bad input: each one line naming what was wrong (exit status 1; a bad command line, 2).
  bad = {
      ('--workdir', run, '--feature', '4096', '--value', '1'): 'feature index [4096] out of range',
      ('--workdir', run, '--feature', '1', '--scale', '2'): 'no feature statistics',
      ('--workdir', run, '--feature', '1', '--scale', '2', '--max_activation', '1',
       '--max_activation', '2'): 'give one per feature',
      ('--cap=3,1', '--direction', vector): 'lo <= hi',
  }
  for flags, message in bad.items():
    assert steer.main([*flags] + common, model=smollm2) == 1
    assert message in capsys.readouterr().err
  assert steer.main(['--feature', '1', '--value', '2'] + common, model=smollm2) == 2
  assert '--feature needs --workdir' in capsys.readouterr().err
