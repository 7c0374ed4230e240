"""Emotion concept vectors from the model's own stories: cross-validated ranking and steering.

The method of Anthropic's emotion-concept work, at SmolLM2's scale:
1. the model writes a short story for every (emotion, character) pair
   (`dictlearn.analysis.texts`, cached);
2. each story is read as plain text after BOS; an emotion's vector is the mean
   activation over its training stories minus the mean over all emotions'
   (`vectors.concept_vectors`), with the top principal components of neutral
   text (the `builtin` corpus, Python documentation) projected out;
3. every story is ranked by vectors made without its character's stories
   (leave-one-character-out): its mean activation, minus the training baseline,
   is projected on every emotion's unit vector, and it counts as right when its
   own emotion projects highest (chance 1/n). Beside it, how often a story holds
   more of its own emotion's words than of any other's: how clearly the
   model's stories carry the emotion asked for at all;
4. steering: `strength * mean residual norm * unit vector` is added at every
   position of neutral prompts (`steering.add`; one compiled program for the
   whole sweep), and the log-probability that the next token is one of the
   emotion's words is compared with the unsteered model's.

Run by `dictlearn.analysis.reproduce` with `experiments/emotion_vectors.py`; the
vectors (made from every story) are saved to
OUT/emotion_vectors.<site>.safetensors (`vectors_io`).
"""
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.analysis import activations
from dictlearn.analysis import steering
from dictlearn.analysis import texts as texts_lib
from dictlearn.analysis import vectors
from dictlearn.analysis import vectors_io
from dictlearn.data import corpus as corpus_lib
from dictlearn.lm import llama

log = logging.getLogger(__name__)

READOUT_TEXT = ('I was so happy to see her again after all these years. Then she told me what '
                'he had done, and I was furious.')


def story_chats(config) -> list[tuple[str, int, str]]:
  """(emotion, character index, chat prompt) of every story, emotion-major.

  Raises:
    ValueError: an emotion without a feeling phrase or emotion words in the config.
  """
  for field in ('feelings', 'emotion_words'):
    missing = [e for e in config.emotions if e not in config[field]]
    if missing:
      raise ValueError(f'config.{field} has no entry for emotions {missing}; it has '
                       f'{sorted(config[field])}.')
  return [(e, j, config.story_prompt.format(character=ch, feeling=config.feelings[e]))
          for e in config.emotions for j, ch in enumerate(config.characters)]


def neutral_tokens(tokenizer, n_texts: int, n_tokens: int) -> list[list[int]]:
  """The first `n_tokens` tokens (after BOS) of the first `n_texts` builtin-corpus documents."""
  out = []
  for doc in corpus_lib.Corpus(corpus_lib.BUILTIN).documents():
    if len(out) == n_texts:
      break
    ids = tokenizer.encode(doc.text)[:n_tokens]
    if ids:
      out.append([tokenizer.bos_id] + ids)
  return out


def cross_validated_ranking(acts, skip, neutral):
  """Leave-one-character-out ranking of every story by the emotion vectors.

  For each character, vectors are made from the other characters' stories
  (`vectors.concept_vectors`: mean of each emotion minus the mean of all, neutral
  directions projected out); each of the left-out character's stories, minus
  the training baseline, is projected on every emotion's unit vector, and it
  counts as right when its own emotion projects highest.

  Args:
    acts: {(emotion, character index): activations of that story}.
    skip: leading positions left out (1: BOS).
    neutral: (k, d) directions projected out of the vectors, or None.

  Returns:
    (accuracy, confusion (n, n) counts: row = the story's emotion, column = the
     emotion ranked first), emotions in first-seen order.
  """
  emotions = list(dict.fromkeys(e for e, _ in acts))
  characters = sorted({c for _, c in acts})
  confusion = np.zeros((len(emotions), len(emotions)), np.int64)
  for held in characters:
    train = {e: [a for (e2, c), a in acts.items() if e2 == e and c != held] for e in emotions}
    vecs = vectors.concept_vectors(train, skip=skip, neutral=neutral)
    baseline = np.mean([vectors.mean_activation(train[e], skip=skip) for e in emotions], axis=0)
    units = np.stack([vecs[e] / np.linalg.norm(vecs[e]) for e in emotions])
    for i, e in enumerate(emotions):
      if (e, held) in acts:
        scores = units @ (acts[e, held][skip:].mean(axis=0) - baseline)
        confusion[i, int(np.argmax(scores))] += 1
  return float(np.trace(confusion) / max(confusion.sum(), 1)), confusion


def keyword_ranking(stories, words) -> float:
  """How often a story holds more of its own emotion's words than of any other's.

  Args:
    stories: [(emotion, text)].
    words: {emotion: words}, matched as whole words, any case.

  Returns:
    The share of stories whose own emotion has strictly the most matches (a
    gauge of how clearly the model's stories carry the emotion asked for).
  """
  patterns = {e: re.compile(r'\b(' + '|'.join(map(re.escape, w)) + r')\b', re.IGNORECASE)
              for e, w in words.items()}
  right = 0
  for emotion, text in stories:
    counts = {e: len(p.findall(text)) for e, p in patterns.items()}
    best = max(counts.values())
    right += counts[emotion] == best > 0 and list(counts.values()).count(best) == 1
  return right / max(len(stories), 1)


def word_token_ids(tokenizer, words) -> list[int]:
  """The first token of ' word' for each word, without repeats."""
  ids = []
  for w in words:
    first = tokenizer.encode(' ' + w)[0]
    if first not in ids:
      ids.append(first)
  return ids


def steering_sweep(model, config, vecs, site, words, mean_norm):
  """log P(next token is one of an emotion's words), per emotion steered and strength.

  Returns:
    {steered emotion: {'strengths': [...], 'own': [...], 'others': [...]}} with
    'own' the mean over prompts of log P(own words) and 'others' the mean over
    the other emotions' word sets, at strength 0 and each of config.steer_strengths.
  """
  cfg, params, tokenizer = model
  emotions = list(vecs)
  ids = [word_token_ids(tokenizer, words[e]) for e in emotions]
  tokens = activations.encode_texts(tokenizer, config.steer_prompts)
  order, batch, mask = next(activations.padded_batches(tokens, len(tokens), tokenizer.pad_id))
  last = np.array([len(tokens[i]) - 1 for i in order])

  @jax.jit
  def log_p(params, direction, coefficient):
    patch = steering.add(site, direction, coefficient)
    logits, _ = llama.forward(params, cfg, batch, attention_mask=mask, interventions=[patch])
    logp = jax.nn.log_softmax(logits[jnp.arange(len(last)), last], axis=-1)
    return jnp.stack([jax.nn.logsumexp(logp[:, jnp.asarray(i)], axis=-1) for i in ids], axis=1)

  strengths = [0.0] + list(config.steer_strengths)
  out = {}
  for j, e in enumerate(emotions):
    unit = vecs[e] / np.linalg.norm(vecs[e])
    own, others = [], []
    for s in strengths:
      lp = np.asarray(log_p(params, jnp.asarray(unit, jnp.float32),
                            jnp.float32(s * mean_norm)))
      own.append(float(lp[:, j].mean()))
      others.append(float(np.delete(lp, j, axis=1).mean()))
    out[e] = {'strengths': strengths, 'own': own, 'others': others}
    log.info('steering %s: log P(own words) %s', e, [round(v, 2) for v in own])
  return out


def run(config, model, *, model_path: str, out_dir: str) -> dict:
  """The emotion-vector experiment (see experiments/emotion_vectors.py)."""
  cfg, _, tokenizer = model
  if config.steer_site not in config.sites:
    raise ValueError(f'config.steer_site {config.steer_site!r} is not among config.sites '
                     f'{list(config.sites)}.')
  stories_spec = story_chats(config)
  stories = texts_lib.model_replies(model, [c for _, _, c in stories_spec],
                                    texts_lib.Sampling.from_config(config.sampling),
                                    model_path=model_path, cache_dir=config.cache_dir)
  kept = [i for i, s in enumerate(stories) if s.strip()]
  acts = activations.read_activations(
      model, activations.encode_texts(tokenizer, [stories[i] for i in kept]), config.sites,
      batch_size=config.batch_size, progress=True)
  neutral = activations.read_activations(
      model, neutral_tokens(tokenizer, config.neutral_texts, config.neutral_tokens), config.sites,
      batch_size=config.batch_size)
  words = {e: config.emotion_words[e] for e in config.emotions}
  results = {'emotions': list(config.emotions), 'stories': len(kept),
             'chance': 1 / len(config.emotions), 'sites': {},
             'keyword_accuracy': keyword_ranking(
                 [(stories_spec[i][0], stories[i]) for i in kept], words),
             'example_story': {e: next(stories[i] for i in kept if stories_spec[i][0] == e)
                               for e in config.emotions}}
  for site in config.sites:
    by_story = {stories_spec[i][:2]: a for a, i in zip(acts[site], kept)}
    basis = vectors.neutral_subspace(neutral[site], variance=config.neutral_variance,
                                     skip=config.skip_tokens)
    raw_acc, _ = cross_validated_ranking(by_story, config.skip_tokens, None)
    acc, confusion = cross_validated_ranking(by_story, config.skip_tokens, basis)
    results['sites'][site] = {'accuracy': acc, 'accuracy_without_projection': raw_acc,
                              'neutral_components': int(len(basis)),
                              'confusion': confusion.tolist(), 'scored': int(confusion.sum())}
    log.info('%s: cross-validated accuracy %.3f (%.3f without the neutral projection)', site, acc,
             raw_acc)
    # The saved vectors use every story.
    vecs = vectors.concept_vectors({e: [a for (e2, _), a in by_story.items() if e2 == e]
                                    for e in config.emotions},
                                   skip=config.skip_tokens, neutral=basis)
    path = os.path.join(out_dir, f'emotion_vectors.{site}.safetensors')
    vectors_io.save_vectors(path, vecs, site=site,
                            model=vectors_io.model_identity(cfg, model_path), provenance={
                                'method': 'mean over the emotion\'s stories minus the mean over '
                                          'all emotions\' (per-story means), top neutral '
                                          'principal components projected out',
                                'story_prompt': config.story_prompt,
                                'characters': list(config.characters),
                                'feelings': config.feelings.to_dict(),
                                'sampling': config.sampling.to_dict(),
                                'neutral': f'builtin corpus, {config.neutral_texts} documents x '
                                           f'{config.neutral_tokens} tokens, variance '
                                           f'{config.neutral_variance}',
                                'skip_tokens': config.skip_tokens})
    if site == config.steer_site:
      saved_vectors = vecs
      mean_norm = float(np.mean([np.linalg.norm(a[config.skip_tokens:], axis=1).mean()
                                 for a in neutral[site]]))
  results['mean_residual_norm'] = mean_norm
  results['vector_norms'] = {e: float(np.linalg.norm(v)) for e, v in saved_vectors.items()}
  results['steering'] = steering_sweep(model, config, saved_vectors, config.steer_site,
                                       config.emotion_words, mean_norm)
  results['readout'] = {e: vectors.readout(model, READOUT_TEXT, saved_vectors[e],
                                           config.steer_site).values.tolist()
                        for e in config.emotions[:3]}
  results['readout_tokens'] = vectors.readout(model, READOUT_TEXT, saved_vectors[
      config.emotions[0]], config.steer_site).tokens
  return results


def summary(results: dict) -> str:
  """Held-out accuracy per site and the steering sweep, as tables."""
  lines = [f'{results["stories"]} stories, {len(results["emotions"])} emotions, chance '
           f'{results["chance"]:.3f}; stories holding more of their own emotion\'s words than '
           f'of any other\'s: {results["keyword_accuracy"]:.3f}',
           'leave-one-character-out accuracy of ranking each story by the emotion vectors:',
           f'{"site":<28}{"accuracy":>10}{"no projection":>15}{"neutral PCs":>13}']
  for site, r in results['sites'].items():
    lines.append(f'{site:<28}{r["accuracy"]:10.3f}{r["accuracy_without_projection"]:15.3f}'
                 f'{r["neutral_components"]:13d}')
  last = results['sites'][list(results['sites'])[-1]]['confusion']
  lines.append(f'per emotion at {list(results["sites"])[-1]} (right / stories): ' + ', '.join(
      f'{e} {row[i]}/{sum(row)}' for i, (e, row) in enumerate(zip(results['emotions'], last))))
  strengths = next(iter(results['steering'].values()))['strengths']
  lines.append('steering (added: strength x mean residual norm '
               f'{results["mean_residual_norm"]:.1f} x unit vector), change in log P(own '
               'emotion words) at the next token; [other emotions\' words, mean]')
  lines.append(f'{"emotion":<12}' + ''.join(f'{s:>16}' for s in strengths[1:]))
  for e, r in results['steering'].items():
    lines.append(f'{e:<12}' + ''.join(
        f'{r["own"][k] - r["own"][0]:+8.2f} [{r["others"][k] - r["others"][0]:+5.2f}]'
        for k in range(1, len(strengths))))
  return '\n'.join(lines)
