"""Reproduction 2, ActAdd (Turner et al. 2023): "Love" - "Hate" added at a middle layer.

The steering vector is the difference of the residual stream entering block L
on two prompts, S + plus and S + minus (the shorter padded with spaces, as the
paper does), one row per position, where S is `config.document_start` (GPT-2's
<|endoftext|> in the paper, and SmolLM2's: after its tokenizer's BOS,
<|im_start|>, a capitalised word is an outlier of norm ~600 instead of ~100).
Added with coefficient c at the front positions of a prompt that also starts
with S (row j at position j; the rows of S are equal, so their difference is
zero), or its mean non-S row at every position. Measured on the
next token after neutral prompts:

    logodds = log P(positive words) - log P(negative words)

(the word sets' first tokens, summed probabilities), averaged over prompts and
expected to rise monotonically with c; and the perplexity of unrelated text
with the same injection, against the unsteered model. Every coefficient runs
one compiled program (c is traced).
"""
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dictlearn.analysis import steering
from dictlearn.lm import generate as gen
from dictlearn.lm import llama


def word_ids(tokenizer, words) -> np.ndarray:
  """The first token of each word (with its leading space as written)."""
  return np.unique([tokenizer.encode(w)[0] for w in words])


def steering_vector(params, cfg, tokenizer, plus: str, minus: str, site: str,
                    start: str) -> jax.Array:
  """ActAdd's (n, d_model) vector: act(start + plus) - act(start + minus), padded with spaces."""
  return steering.prompt_difference(params, cfg, tokenizer.encode(start + plus),
                                    tokenizer.encode(start + minus), site,
                                    pad_id=tokenizer.encode(' ')[0])


def _sweep(params, cfg, tokens, mask, make, coefficients):
  """Log-probabilities (batch, seq, vocab) under the interventions make(c), per c (one program)."""
  out = []
  for c in coefficients:
    logits, _ = llama.forward(params, cfg, tokens, attention_mask=mask, interventions=make(c))
    out.append(jax.nn.log_softmax(logits, axis=-1))
  return out


def run(config: ml_collections.ConfigDict, model, *, model_path: Optional[str] = None,
        out_dir: Optional[str] = None) -> dict:
  """The coefficient sweeps at each layer of `config.layers`, in both injection modes."""
  del model_path, out_dir
  cfg, params, tok = model
  prompts = [tok.encode(config.document_start + p) for p in config.prompts]
  tokens, mask = gen.pad_right(prompts, tok.pad_id)
  last = np.asarray([len(p) - 1 for p in prompts])
  rows = np.arange(len(prompts))
  text_tokens, text_mask = gen.pad_right(
      [tok.encode(config.document_start + t) for t in config.unrelated_texts], tok.pad_id)
  positive, negative = word_ids(tok, config.positive_words), word_ids(tok, config.negative_words)
  coefficients = {'front': list(config.front_coefficients), 'all': list(config.all_coefficients)}
  results = {'layers': {}, 'coefficients': coefficients, 'main_layer': config.layer,
             'main_mode': config.main_mode}

  def interventions(mode, site, vector, c):
    if mode == 'front':
      return [steering.add(site, vector, c)]  # row j at position j
    return [steering.add(site, jnp.mean(vector[1:], axis=0), c)]  # every position

  for layer in config.layers:
    site = f'blocks.{layer}.hook_resid_pre'
    vector = steering_vector(params, cfg, tok, config.plus, config.minus, site,
                             config.document_start)
    per_layer = {'site': site, 'vector_norm': float(jnp.linalg.norm(vector[1:], axis=-1).max())}
    for mode in config.modes:
      make = lambda c, mode=mode: interventions(mode, site, vector, c)
      logodds, p_pos, ppl = [], [], []
      for lp, text_lp in zip(_sweep(params, cfg, tokens, mask, make, coefficients[mode]),
                             _sweep(params, cfg, text_tokens, text_mask, make,
                                    coefficients[mode])):
        nxt = np.asarray(lp)[rows, last]
        log_pos = jax.nn.logsumexp(nxt[:, positive], axis=-1)
        log_neg = jax.nn.logsumexp(nxt[:, negative], axis=-1)
        logodds.append(float(jnp.mean(log_pos - log_neg)))
        p_pos.append(float(jnp.mean(jnp.exp(log_pos))))
        ppl.append(float(jnp.exp(llama.cross_entropy(text_lp, text_tokens, text_mask))))
      per_layer[mode] = {'logodds': logodds, 'p_positive': p_pos, 'perplexity': ppl,
                         'perplexity_ratio': [p / ppl[0] for p in ppl],
                         'monotone': all(b > a for a, b in zip(logodds, logodds[1:]))}
    results['layers'][layer] = per_layer
  # Greedy completions at the main layer and mode, one per coefficient (one program).
  site = f'blocks.{config.layer}.hook_resid_pre'
  vector = steering_vector(params, cfg, tok, config.plus, config.minus, site,
                           config.document_start)
  results['completions'] = {}
  for c in coefficients[config.main_mode]:
    out = gen.generate(params, cfg, prompts[:config.shown_completions],
                       max_new_tokens=config.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       interventions=interventions(config.main_mode, site, vector, c))
    results['completions'][f'{c:g}'] = [tok.decode(o) for o in out]
  return results


def summary(results: dict) -> str:
  """The table of `run`'s results."""
  lines = []
  for r in results['layers'].values():
    for mode in ('front', 'all'):
      if mode not in r:
        continue
      lines.append(f"{r['site']} ({mode} positions; vector norm {r['vector_norm']:.1f}); "
                   f"log-odds monotone: {r[mode]['monotone']}")
      lines.append('  c            ' + ''.join(f'{c:>9g}' for c in results['coefficients'][mode]))
      for name, key in (('log-odds', 'logodds'), ('P(pos)', 'p_positive'),
                        ('ppl ratio', 'perplexity_ratio')):
        lines.append(f'  {name:<12} ' + ''.join(f'{v:>9.3f}' for v in r[mode][key]))
  lines.append(f"greedy completions, block {results['main_layer']}, {results['main_mode']} "
               'positions:')
  for c, texts in results['completions'].items():
    lines.append(f'  c={c}: ' + ' | '.join(repr(t) for t in texts))
  return '\n'.join(lines)
