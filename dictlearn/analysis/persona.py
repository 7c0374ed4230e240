"""The persona axis (the Assistant-Axis method) and activation capping along it.

Persona vectors are the mean activations over the model's replies in each
persona (`vectors.persona_activations`); their leading principal component,
oriented toward the default assistant, is the persona axis
(`vectors.persona_space`). Capping keeps the projection of the activation on
that axis inside a band taken from the default assistant's own tokens
(`steering.cap`), during generation; a second forward pass over the prompt and
the capped completion, with the same cap and the completion marked as generated,
reads the site and checks the projection at every generated token. Run by
`dictlearn.analysis.reproduce` with `experiments/persona_axis.py`; the axis is
saved to OUT/persona_axis.safetensors (`vectors_io`).
"""
import logging
import os

import numpy as np

from dictlearn.analysis import activations
from dictlearn.analysis import steering
from dictlearn.analysis import texts as texts_lib
from dictlearn.analysis import vectors
from dictlearn.analysis import vectors_io
from dictlearn.lm import generate as generate_lib

log = logging.getLogger(__name__)

ASSISTANT = 'default assistant'


def cap_chat(system: str, user: str) -> list[dict]:
  """A role-play chat; an empty system prompt leaves the template's default."""
  head = [{'role': 'system', 'content': system}] if system else []
  return head + [{'role': 'user', 'content': user}]


def capped_generation(model, chats, axis, lo, hi, site, *, max_new_tokens, batch_size):
  """Greedy completions with and without the cap, and their projections on the axis.

  Returns:
    {'baseline'|'capped': {'texts': [...], 'before': [per completion, the
     projection at `site` of each generated token without the cap], 'after':
     [the same with the run's own interventions]}}. The cap at `site` changes
     nothing upstream of it, so 'before' is what the cap saw.
  """
  cfg, params, tokenizer = model
  prompts = [tokenizer.encode_chat(c) for c in chats]
  out = {}
  for name, interventions in (('baseline', []), ('capped', [steering.cap(site, axis, lo, hi)])):
    completions = generate_lib.generate(params, cfg, prompts, max_new_tokens=max_new_tokens,
                                        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                        interventions=interventions)
    rows = [p + c for p, c in zip(prompts, completions)]
    out[name] = {'texts': [tokenizer.decode(c, skip_special_tokens=True) for c in completions]}
    for key, patches in (('before', []), ('after', interventions)):
      if key == 'after' and not patches:
        out[name][key] = out[name]['before']
        continue
      acts = activations.read_activations(model, rows, [site], batch_size=batch_size,
                                          interventions=patches,
                                          prompt_lengths=[len(p) for p in prompts])[site]
      out[name][key] = [vectors.projections(a[len(p):], axis) for a, p in zip(acts, prompts)]
  return out


def run(config, model, *, model_path: str, out_dir: str) -> dict:
  """The persona-axis experiment (see experiments/persona_axis.py)."""
  cfg = model[0]
  personas = dict(config.personas)
  if ASSISTANT in personas:
    raise ValueError(f'config.personas may not name a persona {ASSISTANT!r}; that name is the '
                     'default assistant\'s.')
  lo_pct, hi_pct = config.cap_percentiles
  if not 0 <= lo_pct <= hi_pct <= 100:
    raise ValueError(f'config.cap_percentiles {tuple(config.cap_percentiles)}: expected '
                     '0 <= lo <= hi <= 100.')
  acts, replies = vectors.persona_activations(
      model, {**personas, ASSISTANT: None}, config.questions, config.site,
      texts_lib.Sampling.from_config(config.sampling), model_path=model_path,
      cache_dir=config.cache_dir, batch_size=config.batch_size)
  means = {name: vectors.mean_activation(a) for name, a in acts.items()}
  assistant = means.pop(ASSISTANT)
  space = vectors.persona_space(means, assistant)
  own = np.concatenate([vectors.projections(a, space.axis) for a in acts[ASSISTANT]])
  lo, hi = (float(np.percentile(own, q)) for q in (lo_pct, hi_pct))
  vectors_io.save_vectors(
      os.path.join(out_dir, 'persona_axis.safetensors'), {'axis': space.axis},
      site=config.site, model=vectors_io.model_identity(cfg, model_path),
      provenance={'method': 'leading principal component of persona vectors (mean activation '
                            'over the replies in each persona), signed toward the default '
                            'assistant', 'personas': personas,
                  'questions': list(config.questions), 'sampling': config.sampling.to_dict(),
                  'cap_band': [lo, hi], 'cap_percentiles': [lo_pct, hi_pct]})
  chats = [cap_chat(system, user) for system, user in config.cap_prompts]
  capped = capped_generation(model, chats, space.axis, lo, hi, config.site,
                             max_new_tokens=config.cap_tokens, batch_size=config.batch_size)
  band = {}
  for name, r in capped.items():
    before, after = np.concatenate(r['before']), np.concatenate(r['after'])
    band[name] = {'tokens': int(after.size), 'outside_before': int(np.sum((before < lo) |
                                                                          (before > hi))),
                  'max_outside': float(max(0.0, np.max(lo - after), np.max(after - hi))),
                  'mean': float(after.mean())}
  order = np.argsort(-space.projections)
  return {
      'site': config.site, 'personas': len(space.names), 'questions': len(config.questions),
      'explained_variance_ratio': space.pca.explained_variance_ratio[:3].tolist(),
      'projections': {space.names[i]: float(space.projections[i]) for i in order},
      'assistant_projection': space.assistant_projection,
      'assistant_rank': space.assistant_rank(), 'contrast_cosine': space.contrast_cosine,
      'band': [lo, hi], 'cap': band,
      'completions': [{'chat': c, 'baseline': b, 'capped': k} for c, b, k in
                      zip(chats, capped['baseline']['texts'], capped['capped']['texts'])],
      'example_replies': {name: replies[name][0] for name in list(replies)[:3] + [ASSISTANT]},
  }


def summary(results: dict) -> str:
  """Persona projections, the assistant's place, and the capping check, as text."""
  evr = ', '.join(f'{v:.2f}' for v in results['explained_variance_ratio'])
  lines = [f'{results["personas"]} personas x {results["questions"]} questions at '
           f'{results["site"]}; variance shares of PC1-3: {evr}',
           'projection on the persona axis (PC1, relative to the personas\' mean):']
  shown = False
  for name, p in results['projections'].items():
    if not shown and p < results['assistant_projection']:
      lines.append(f'  {results["assistant_projection"]:+8.2f}  <{ASSISTANT}>')
      shown = True
    lines.append(f'  {p:+8.2f}  {name}')
  if not shown:
    lines.append(f'  {results["assistant_projection"]:+8.2f}  <{ASSISTANT}>')
  lines.append(f'personas above the assistant: {results["assistant_rank"]}; cosine of the axis '
               f'with assistant - mean persona: {results["contrast_cosine"]:.3f}')
  lo, hi = results['band']
  lines.append(f'cap band [{lo:.2f}, {hi:.2f}] (absolute projection)')
  for name, b in results['cap'].items():
    lines.append(f'  {name:<9} {b["tokens"]} generated tokens, {b["outside_before"]} outside the '
                 f'band before the cap; after it, furthest outside {b["max_outside"]:.2e}, mean '
                 f'projection {b["mean"]:.2f}')
  for c in results['completions']:
    lines.append(f'--- {c["chat"][-1]["content"]!r}' + (
        f' (system: {c["chat"][0]["content"]!r})' if len(c['chat']) > 1 else ''))
    lines.append(f'  baseline: {c["baseline"]!r}')
    lines.append(f'  capped:   {c["capped"]!r}')
  return '\n'.join(lines)
