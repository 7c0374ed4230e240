"""Fast versions of the reproductions (experiments/*.py:tiny) on SmolLM2.

The model-written texts of the emotion and persona experiments are written here
instead (generation is slow on 2 cores and is tested in test_vectors.py): the
model's `chat` is replaced by a function that returns them, so the rest of the
path (cache file, reading, vectors, steering, capping) is the real one.
"""
import dataclasses
import os

import numpy as np
import pytest

from dictlearn import lm
from dictlearn.analysis import on_policy as on_policy_lib
from dictlearn.analysis import reproduce
from dictlearn.analysis import texts as texts_lib
from dictlearn.analysis import vectors
from dictlearn.analysis import vectors_io
from dictlearn.lm import generate as generate_lib
from experiments import emotion_vectors
from experiments import entity_binding
from experiments import on_policy
from experiments import persona_axis

STORIES = {
    'deep happiness': ('She laughed with joy and hugged everyone; it was the best, happiest day.',
                       'He grinned, delighted, and danced around the room singing.',
                       'Their smiles were bright and warm; everything felt wonderful and glad.',
                       'She cheered, overjoyed, and her heart was full of happiness.'),
    'deep sadness': ('She cried alone in the dark, heartbroken and full of grief.',
                     'He stared at the empty chair and wept; he missed her so much.',
                     'Tears fell as the rain came down; nothing would ever be the same.',
                     'He felt lonely and miserable, and sobbed quietly into his hands.'),
    'intense anger': ('He slammed the door and shouted, furious at the insult.',
                      'She clenched her fists, red with rage, and screamed at them.',
                      'He was livid and kicked the wall, cursing the liar.',
                      'She yelled in fury and threw the plate across the room.'),
}


def _fake_chat(replies_by_prompt):
  """A stand-in for `generate.chat` that returns written replies."""
  def chat(params, cfg, tokenizer, messages, **kwargs):
    del params, cfg, tokenizer, kwargs
    return [replies_by_prompt(m) for m in messages]
  return chat


def _story_for(counter):
  def reply(chat):
    text = chat[-1]['content']
    feeling = next(f for f in STORIES if f in text)
    counter[feeling] = counter.get(feeling, -1) + 1
    return STORIES[feeling][counter[feeling]]
  return reply


def _tiny(module, tmp_path):
  config = module.get_config('tiny')
  if 'cache_dir' in config:
    config.unlock()
    config.cache_dir = str(tmp_path / 'cache')
    config.lock()
  return config


def test_emotion_vectors_rank_left_out_stories_and_steer(smollm2, tmp_path, monkeypatch):
  monkeypatch.setattr(generate_lib, 'chat', _fake_chat(_story_for({})))
  config = _tiny(emotion_vectors, tmp_path)
  results = reproduce.run(config, str(tmp_path / 'out'), model=smollm2)
  for site in config.sites:
    r = results['sites'][site]
    assert r['scored'] == 12 and 0 <= r['accuracy'] <= 1
  # Chance is 1/3; 8 of 12 right by chance has probability about 0.02.
  assert results['sites']['blocks.12.hook_resid_post']['accuracy'] >= 8 / 12
  assert results['keyword_accuracy'] > 0.5
  for emotion, r in results['steering'].items():
    assert r['strengths'][0] == 0 and r['own'][-1] > r['own'][0], emotion
  path = tmp_path / 'out' / f'emotion_vectors.{config.steer_site}.safetensors'
  cfg = smollm2[0]
  vector, site = vectors.load_vector(str(path), 'happy', cfg)
  assert site == config.steer_site and vector.shape == (cfg.d_model,)
  other = dict(vectors_io.model_identity(cfg), name='another model')
  with pytest.raises(ValueError, match='made with another model'):
    vectors_io.load_vectors(str(path), other)
  with pytest.raises(ValueError, match=r"no vector 'calm'.*\['angry', 'happy', 'sad'\]"):
    vectors.load_vector(str(path), 'calm', cfg)
  assert 'leave-one-character-out' in reproduce.summary(results)


def test_persona_axis_capping_keeps_every_generated_token_in_the_band(smollm2, tmp_path,
                                                                      monkeypatch):
  def reply(chat):
    system = chat[0]['content'] if chat[0]['role'] == 'system' else ''
    if 'pirate' in system:
      return 'Arr, I sail the seven seas and plunder gold, matey!'
    if 'cat' in system:
      return 'Meow. I nap in the sun and knock cups off the table.'
    if 'teacher' in system:
      return 'I plan lessons, mark homework and help my students learn.'
    return 'I am an AI assistant. I can answer questions and help with tasks.'

  monkeypatch.setattr(generate_lib, 'chat', _fake_chat(reply))
  config = _tiny(persona_axis, tmp_path)
  results = reproduce.run(config, str(tmp_path / 'out'), model=smollm2)
  assert results['personas'] == 3
  assert sum(results['explained_variance_ratio'][:2]) == pytest.approx(1.0)  # 3 points: a plane
  lo, hi = results['band']
  assert lo <= hi
  capped = results['cap']['capped']
  assert capped['tokens'] > 0
  assert capped['max_outside'] <= 1e-4 * max(1.0, abs(lo), abs(hi))
  saved = vectors_io.load_vectors(str(tmp_path / 'out' / 'persona_axis.safetensors'))
  assert saved.site == config.site
  np.testing.assert_allclose(np.linalg.norm(saved.vectors['axis']), 1.0, rtol=1e-5)
  assert 'capped:' in reproduce.summary(results)


def test_on_policy_entropy_ratio_is_reported(smollm2, tmp_path):
  config = _tiny(on_policy, tmp_path)
  results = reproduce.run(config, str(tmp_path / 'out'), model=smollm2)
  for name, figures in results['sources'].items():
    assert figures['tokens'] > 0 and figures['entropy'] > 0, name
  assert set(results['ratio']) == {'model, T=1', 'model, greedy'}
  # A greedy token is the argmax p_max of its distribution, and -log p_max <= entropy:
  # exact at every token when the reply tokens line up with what predicted them.
  sampling = dataclasses.replace(texts_lib.Sampling.from_config(config.sampling),
                                 temperature=0.0, top_p=1.0)
  greedy = texts_lib.model_replies(smollm2, config.prompts, sampling,
                                   model_path=lm.resolve_model(''),
                                   cache_dir=config.cache_dir)
  for stats in on_policy_lib.reply_stats(smollm2, config.prompts, greedy):
    assert np.all(stats['nll'] <= stats['entropy'] + 1e-3), stats
  assert results['sources']['model, greedy']['nll_minus_entropy'] < 0
  assert os.path.isfile(tmp_path / 'out' / 'results.json')


def test_entity_binding_probes_per_layer(smollm2, tmp_path):
  config = _tiny(entity_binding, tmp_path)
  results = reproduce.run(config, str(tmp_path / 'out'), model=smollm2)
  sites = results['sites']
  assert list(sites) == list(config.sites)
  # The attribute's own token is in the embedding; the full stop after it needs attention.
  assert sites['blocks.4.hook_resid_post']['current']['test'] > 0.9
  assert sites['blocks.4.hook_resid_post']['prior']['test'] > sites['hook_embed']['prior']['test']
  assert 0 <= results['model_answer_accuracy'] <= 1


def test_unknown_experiment_is_named(tmp_path):
  config = on_policy.get_config('tiny')
  config.unlock()
  config.experiment = 'persona_drift'
  with pytest.raises(ValueError, match="'persona_drift' is not a reproduction"):
    reproduce.run(config, str(tmp_path))
