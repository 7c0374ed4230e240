"""Concept vectors, PCA, persona space, readouts and the model-written text cache."""
import json
import os

import numpy as np
import pytest

from dictlearn.analysis import activations
from dictlearn.analysis import texts as texts_lib
from dictlearn.analysis import vectors
from dictlearn.lm import generate as generate_lib

SITE = 'blocks.3.hook_resid_post'


# ---- constructed data (no language model) ---------------------------------------------


def test_pca_finds_the_constructed_axis_and_its_share():
  rng = np.random.default_rng(0)
  axis = rng.normal(size=32)
  axis /= np.linalg.norm(axis)
  x = 5.0 + np.outer(rng.normal(size=500) * 10, axis) + rng.normal(size=(500, 32)) * 0.1
  pca = vectors.principal_components(x, 3)
  assert abs(pca.components[0] @ axis) > 0.9999
  np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-10)
  assert pca.explained_variance_ratio[0] > 0.99
  np.testing.assert_allclose(pca.project(x)[:, 0], (x - x.mean(0)) @ pca.components[0])


def test_neutral_subspace_takes_the_fewest_components_covering_the_variance():
  rng = np.random.default_rng(1)
  scales = np.array([10.0, 5.0, 1.0, 0.5])  # variance shares ~ .79, .20, .008, .002
  x = rng.normal(size=(4000, 4)) * scales
  basis = vectors.neutral_subspace([x[:2000], x[2000:]], variance=0.5)
  assert basis.shape == (1, 4) and abs(basis[0, 0]) > 0.999
  assert vectors.neutral_subspace([x], variance=0.95).shape == (2, 4)


def test_concept_vectors_are_mean_differences_with_neutral_directions_removed():
  rng = np.random.default_rng(2)
  a = [rng.normal(size=(n, 8)) + [3, 0, 0, 0, 0, 0, 0, 1] for n in (5, 9)]
  b = [rng.normal(size=(n, 8)) - [3, 0, 0, 0, 0, 0, 0, 1] for n in (7,)]
  mean_a = np.mean([t[1:].mean(0) for t in a], axis=0)  # per-text means, BOS (row 0) skipped
  mean_b = b[0][1:].mean(0)
  got = vectors.concept_vectors({'a': a, 'b': b}, skip=1)
  np.testing.assert_allclose(got['a'], mean_a - (mean_a + mean_b) / 2, rtol=1e-5)
  got = vectors.concept_vectors({'a': a}, b, skip=1)
  np.testing.assert_allclose(got['a'], mean_a - mean_b, rtol=1e-5)
  neutral = np.eye(8)[:1]  # project out dimension 0
  got = vectors.concept_vectors({'a': a}, b, skip=1, neutral=neutral)
  assert got['a'][0] == 0 and got['a'][7] == pytest.approx(mean_a[7] - mean_b[7], rel=1e-5)


def test_persona_space_axis_is_the_leading_direction_oriented_to_the_assistant():
  rng = np.random.default_rng(3)
  axis = np.zeros(16)
  axis[2] = 1.0
  names = [f'p{i}' for i in range(12)]
  coords = np.linspace(-6, 6, 12)
  persona = {n: c * axis + rng.normal(size=16) * 0.05 for n, c in zip(names, coords)}
  space = vectors.persona_space(persona, assistant=-9 * axis)  # beyond the low end
  np.testing.assert_allclose(space.axis, -axis, atol=0.02)  # flipped toward the assistant
  assert space.assistant_projection == pytest.approx(9, abs=0.1)
  assert space.assistant_rank() == 0 and space.contrast_cosine > 0.99
  np.testing.assert_allclose(space.projections, -coords, atol=0.2)


def test_bad_vector_input_is_named():
  with pytest.raises(ValueError, match="text set of 'joy' is empty"):
    vectors.concept_vectors({'joy': [], 'fear': [np.ones((3, 4))]})
  with pytest.raises(ValueError, match='one concept and no baseline'):
    vectors.concept_vectors({'joy': [np.ones((3, 4))]})
  with pytest.raises(ValueError, match='expected the same width'):
    vectors.projections(np.ones((3, 4)), np.ones(5))
  with pytest.raises(ValueError, match='at least three personas'):
    vectors.persona_space({'a': np.ones(4), 'b': np.zeros(4)}, np.ones(4))
  with pytest.raises(ValueError, match='text set is empty'):
    activations.check_texts([], 'stories')


# ---- on SmolLM2 ---------------------------------------------------------------------


def test_readout_is_the_projection_of_the_sites_activation(smollm2):
  cfg, params, tok = smollm2
  model = (cfg, params, tok)
  rng = np.random.default_rng(4)
  v = rng.normal(size=cfg.d_model).astype(np.float32)
  text = 'The cat sat quietly on the warm mat.'
  got = vectors.readout(model, text, v, SITE)
  ids = [tok.bos_id] + tok.encode(text)
  from dictlearn import lm
  _, acts = lm.forward(params, cfg, np.asarray([ids]), read_sites=[SITE], return_logits=False)
  want = np.asarray(acts[SITE][0], np.float64) @ (v / np.linalg.norm(v))
  np.testing.assert_allclose(got.values, want, rtol=1e-4, atol=1e-4)
  assert len(got.tokens) == len(ids) and ''.join(got.tokens[1:]) == text
  with pytest.raises(ValueError, match=r'expected \(576,\)'):
    vectors.readout(model, text, v[:100], SITE)
  with pytest.raises(ValueError, match="Unknown hook site 'blocks.99.hook_resid_post'"):
    vectors.readout(model, text, v, 'blocks.99.hook_resid_post')
  with pytest.raises(ValueError, match='has no tokens'):
    vectors.readout(model, '', v, SITE)
  with pytest.raises(ValueError, match='text set is empty'):
    activations.read_activations(model, [], [SITE])
  with pytest.raises(ValueError, match='non-empty list of hook-site names'):
    activations.read_activations(model, [[1, 2]], [])


def test_batched_activations_equal_one_text_at_a_time(smollm2):
  cfg, params, tok = smollm2
  model = (cfg, params, tok)
  ids = activations.encode_texts(tok, ['One short text.', 'A second, somewhat longer text here.',
                                       'Third.'])
  together = activations.read_activations(model, ids, [SITE], batch_size=2)[SITE]
  for row, a in zip(ids, together):
    alone = activations.read_activations(model, [row], [SITE], batch_size=1)[SITE][0]
    assert a.shape == (len(row), cfg.d_model)
    np.testing.assert_allclose(a, alone, rtol=1e-4, atol=1e-4)


def test_model_replies_are_generated_once_then_read_from_the_cache(smollm2, tmp_path,
                                                                   monkeypatch):
  cfg, params, tok = smollm2
  model = (cfg, params, tok)
  model_path = str(tmp_path / 'model.gguf')  # only its name and size enter the key
  with open(model_path, 'wb') as f:
    f.write(b'x' * 10)
  sampling = texts_lib.Sampling(max_new_tokens=4, temperature=0.0, batch_size=2)
  chats = ['Say hello.', [{'role': 'system', 'content': 'You are a pirate.'},
                          {'role': 'user', 'content': 'Say hello.'}]]
  first = texts_lib.model_replies(model, chats, sampling, model_path=model_path,
                                  cache_dir=str(tmp_path))
  path = texts_lib.cache_path(chats, sampling, model_path=model_path, cache_dir=str(tmp_path))
  assert os.path.isfile(path) and not os.path.exists(path + '.partial')
  assert len(first) == 2 and all(isinstance(r, str) and r for r in first)

  def no_generation(*args, **kwargs):
    raise AssertionError('the cache was not reused')

  monkeypatch.setattr(generate_lib, 'chat', no_generation)
  assert texts_lib.model_replies(model, chats, sampling, model_path=model_path,
                                 cache_dir=str(tmp_path)) == first
  # Other settings are another file, so they would generate.
  other = texts_lib.Sampling(max_new_tokens=5, temperature=0.0, batch_size=2)
  assert texts_lib.cache_path(chats, other, model_path=model_path,
                              cache_dir=str(tmp_path)) != path
  with open(path, 'w', encoding='utf-8') as f:  # a file that holds other chats is refused
    f.write(json.dumps({'prompt': [{'role': 'user', 'content': 'x'}], 'text': 'y'}) + '\n')
  with pytest.raises(ValueError, match='not those of the 2 chats'):
    texts_lib.model_replies(model, chats, sampling, model_path=model_path,
                            cache_dir=str(tmp_path))
