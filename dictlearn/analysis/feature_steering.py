"""Reproduction 1, features that steer: an SAE feature clamped high, and to zero.

`run(config, model)` with an experiments/steer_features.py config; `summary(results)`
is its table. Every condition runs one compiled program: the clamp value is traced,
and the baseline is that program with the clamp switched off (`steering.switched_off`).
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dictlearn.analysis import statistics
from dictlearn.analysis import steering
from dictlearn.lm import generate as gen
from dictlearn.lm import llama


def log_probs(params, cfg, tokens, mask, interventions, read_sites=()):
  """Next-token log-probabilities (batch, seq, vocab) and the activations read."""
  logits, acts = llama.forward(params, cfg, tokens, attention_mask=mask, read_sites=read_sites,
                               interventions=interventions)
  return jax.nn.log_softmax(logits, axis=-1), acts


def monotone(values: Sequence[float]) -> bool:
  """Whether `values` strictly increase."""
  return all(b > a for a, b in zip(values, values[1:]))


def round_up(n: int, multiple: int = gen.PROMPT_BUCKET) -> int:
  return -(-n // multiple) * multiple


def run(config: ml_collections.ConfigDict, model, *, model_path: Optional[str] = None,
        out_dir: Optional[str] = None, sae: Optional[steering.SaeAtSite] = None) -> dict:
  """Clamps one SAE feature high at three strengths, and to zero; measures what follows.

  Measured, per condition (baseline, clamped to 0 and to each multiple of the
  feature's max activation), over greedy completions of neutral chat prompts:
    feature_on_generated: the feature's mean activation on the generated tokens,
      read back by the unpatched model (does the text itself carry the feature?);
    p_top_logit: the mean next-token probability of the feature's top-logit
      tokens on fixed text (the baseline completions), with the clamp applied;
    mentions: the share of completions containing `config.concept_word`.
  The top-logit tokens are those whose log-probability rises most, averaged over
  `reference_texts`, when one max activation of the feature's decoder direction
  is added (through the rest of the model; from block 12 the direct unembedding
  of a decoder row is noise). Clamped to zero on `probe_prompts` (where the
  model brings up the concept unsteered): the same measures against baseline.
  """
  del model_path, out_dir  # nothing saved besides the results
  cfg, params, tok = model
  if sae is None:
    sae = steering.load_sae(config.sae_workdir)
  feature = config.feature
  sae.check_features(feature)
  max_act, top_contexts = config.max_activation, []
  if max_act <= 0 or config.top_contexts:
    about = statistics.load_statistics(config.sae_workdir).feature(feature)
    max_act = about['max_activation'] if max_act <= 0 else max_act
    # BOS and the window before each top activation, up to the token it fires on.
    top_contexts = [[tok.bos_id] + c['tokens'][:c['centre'] + 1] for c in about['contexts']
                    if c['kind'] == 'top'][:config.top_contexts]

  def program(clamp_value=None, add_coefficient=None):
    """One structure for every forward and generation: [clamp, add], each on or off."""
    clamp = steering.clamp(sae, feature, 0.0 if clamp_value is None else clamp_value)
    add = steering.add_feature(sae, feature, add_coefficient or 0.0)
    return ([clamp] if clamp_value is not None else steering.switched_off([clamp])) + (
        [add] if add_coefficient is not None else steering.switched_off([add]))

  chat = lambda prompts: [tok.encode_chat([{'role': 'user', 'content': p}]) for p in prompts]
  width = round_up(max(len(p) for p in chat(list(config.prompts) + list(config.probe_prompts)))
                   + config.max_new_tokens)

  # The feature's top-logit tokens.
  ref_tokens, ref_mask = gen.pad_right([tok.encode(t) for t in config.reference_texts],
                                       tok.pad_id, width)
  base_lp, _ = log_probs(params, cfg, ref_tokens, ref_mask, program())
  add_lp, _ = log_probs(params, cfg, ref_tokens, ref_mask, program(add_coefficient=max_act))
  weights = jnp.asarray(ref_mask, jnp.float32)[..., None]
  effect = jnp.sum((add_lp - base_lp) * weights, axis=(0, 1)) / jnp.sum(weights)
  top_ids = np.asarray(jax.lax.top_k(effect, config.top_logit_k)[1])
  top_tokens = [tok.decode([int(t)]) for t in top_ids]

  def measure(prompts, clamp_value, fixed=None):
    """Greedy completions under the condition and the three measures."""
    outs = gen.generate(params, cfg, prompts, max_new_tokens=config.max_new_tokens,
                        eos_id=tok.eos_id, pad_id=tok.pad_id, interventions=program(clamp_value))
    seqs = [p + o for p, o in zip(prompts, outs)]
    tokens, mask = gen.pad_right(seqs, tok.pad_id, width)
    _, acts = log_probs(params, cfg, tokens, mask, program(), read_sites=[sae.site])
    own = np.asarray(sae.encode(acts[sae.site])[..., feature])
    fixed = seqs if fixed is None else fixed
    tokens, mask = gen.pad_right(fixed, tok.pad_id, width)
    lp, _ = log_probs(params, cfg, tokens, mask, program(clamp_value))
    p_top = np.asarray(jnp.sum(jnp.exp(lp[..., top_ids]), axis=-1))
    on_generated = np.zeros(mask.shape, bool)
    predicts_generated = np.zeros(mask.shape, bool)
    for row, (p, s) in enumerate(zip(prompts, fixed)):
      on_generated[row, len(p):len(p) + len(outs[row])] = True
      predicts_generated[row, len(p) - 1:len(s) - 1] = True
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    return {
        'value': clamp_value,
        'feature_on_generated': float(own[on_generated].mean()) if on_generated.any() else 0.0,
        'fires_on_generated': float((own[on_generated] > 0).mean()) if on_generated.any() else 0.0,
        'p_top_logit': float(p_top[predicts_generated].mean()),
        'mentions': float(np.mean([config.concept_word.lower() in t.lower() for t in texts])),
        'completions': texts,
    }, seqs

  prompts, probes = chat(config.prompts), chat(config.probe_prompts)
  baseline, fixed = measure(prompts, None)
  conditions = {'baseline': baseline}
  conditions['clamp 0'] = measure(prompts, 0.0, fixed)[0]
  for multiple in config.multiples:
    conditions[f'clamp {multiple:g}x max'] = measure(prompts, multiple * max_act, fixed)[0]
  probe = {}
  if probes:
    probe_base, probe_fixed = measure(probes, None)
    probe = {'baseline': probe_base, 'clamp 0': measure(probes, 0.0, probe_fixed)[0]}
  high = [conditions[f'clamp {m:g}x max'] for m in config.multiples]
  firing = {}
  if top_contexts:
    # Where the feature fires most in the store: its activation there (read back at the
    # site) and the probability of its top-logit tokens, unsteered and clamped to zero.
    tokens, mask = gen.pad_right(top_contexts, tok.pad_id, width)
    last = np.asarray([len(c) - 1 for c in top_contexts])
    rows = np.arange(len(top_contexts))
    for name, value in (('baseline', None), ('clamp 0', 0.0)):
      lp, acts = log_probs(params, cfg, tokens, mask, program(value), read_sites=[sae.site])
      lp = np.asarray(lp)[rows, last]
      own = np.asarray(sae.encode(acts[sae.site])[..., feature])[rows, last]
      firing[name] = {'feature': float(own.mean()),
                      'p_top_logit': float(np.exp(lp[:, top_ids]).sum(-1).mean())}
  return {
      'site': sae.site, 'feature': feature,
      'reading': config.reading, 'max_activation': max_act, 'top_logit_tokens': top_tokens,
      'conditions': conditions, 'probe': probe, 'top_contexts': firing,
      'monotone_feature_on_generated': monotone(
          [baseline['feature_on_generated']] + [c['feature_on_generated'] for c in high]),
      'monotone_p_top_logit': monotone(
          [baseline['p_top_logit']] + [c['p_top_logit'] for c in high]),
  }


def summary(result: dict) -> str:
  """The table of `run`'s results."""
  lines = [f"feature {result['feature']} at {result['site']} ({result['reading']}), max "
           f"activation {result['max_activation']:.2f}",
           f"top-logit tokens: {result['top_logit_tokens']}",
           f"{'condition':<20} {'value':>7} {'feature on gen.':>16} {'fires':>6} "
           f"{'P(top-logit)':>13} {'mentions':>9}"]
  for block, rows in (('neutral prompts', result['conditions']),
                      ('probe prompts', result['probe'])):
    lines.append(f'-- {block}')
    for name, r in rows.items():
      value = '-' if r['value'] is None else f"{r['value']:.2f}"
      lines.append(f"{name:<20} {value:>7} {r['feature_on_generated']:>16.3f} "
                   f"{r['fires_on_generated']:>6.2f} {r['p_top_logit']:>13.4f} "
                   f"{r['mentions']:>9.2f}")
  for name, r in result['top_contexts'].items():
    lines.append(f"top store contexts, {name:<10} feature at the firing token {r['feature']:.3f}"
                 f"   P(top-logit) next {r['p_top_logit']:.4f}")
  lines.append(f"monotone over baseline and the three strengths: feature on generated "
               f"{result['monotone_feature_on_generated']}, P(top-logit) "
               f"{result['monotone_p_top_logit']}")
  for name, r in result['conditions'].items():
    lines.append(f'[{name}] {r["completions"][0]!r}')
  return '\n'.join(lines)


