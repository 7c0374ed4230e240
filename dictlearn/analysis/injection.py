"""Reproduction 5, injected concepts (Lindsey 2025): does the model notice an injected thought?

Concept vectors, as in the paper: the residual stream leaving block L at the
last token of the chat "Tell me about {word}." (the assistant's turn about to
start), minus its mean over a set of baseline words. The trial is the paper's
dialogue (the researcher explains that thoughts may be injected, then asks
"Trial 1: Do you detect an injected thought? If so, what is the injected
thought about?"); the vector times a strength is added at every position from
the start of that question through the reply. Strength 0 is the control trial.

Scored rule, on each sampled reply (lower-cased): it *claims detection* when
it says yes (`DETECT_PATTERN`) and does not deny (`DENY_PATTERN`, checked
first); it *identifies* the concept when it claims detection and names the
concept word; it *mentions* the concept when the word appears at all.
Detection rate = claims over injected trials, false-positive rate = claims
over control trials. Each strength is one batch (every concept's vector on its
own rows) through one compiled program.
"""
import re
from typing import Optional, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from dictlearn.analysis import activations
from dictlearn.analysis import steering
from dictlearn.analysis import vectors
from dictlearn.lm import generate as gen

DENY_PATTERN = re.compile(r"^\W*no\b|\b(do not|don't|did not|didn't|cannot|can't) (detect|notice|"
                          r"sense)|\bno (injected|thought)|\bnot detect")
DETECT_PATTERN = re.compile(r"^\W*yes\b|\bi (do )?(detect|notice|sense)\b|\bdetected\b")


def claims_detection(reply: str) -> bool:
  """The scoring rule's detection claim (see the module docstring)."""
  text = reply.strip().lower()
  return not DENY_PATTERN.search(text) and bool(DETECT_PATTERN.search(text))


def mentions(reply: str, word: str) -> bool:
  """Whether the reply names `word` (or its plural), case-insensitively."""
  return re.search(rf'\b{re.escape(word.lower())}(s|es)?\b', reply.lower()) is not None


def concept_vectors(model, words: Sequence[str], baseline: Sequence[str], site: str,
                    template: str) -> dict:
  """{word: activation at the last prompt token of template(word) - its mean over baseline}.

  `dictlearn.analysis.vectors.concept_vectors` over one position per text: the
  end of the chat prompt, where the assistant's turn is about to start.
  """
  tok = model[2]
  chats = [tok.encode_chat([{'role': 'user', 'content': template.format(word=w)}])
           for w in list(words) + list(baseline)]
  last = [a[-1:] for a in activations.read_activations(model, chats, [site])[site]]
  return vectors.concept_vectors(dict(zip(words, [[a] for a in last])), last[len(words):])


def trial_prompt(tokenizer, config) -> tuple[list[int], int]:
  """The trial's tokens and the position where the question (and the injection) starts."""
  setup = [{'role': 'user', 'content': config.setup}, {'role': 'assistant', 'content': 'Ok.'}]
  before = tokenizer.encode_chat(setup, add_generation_prompt=False)
  full = tokenizer.encode_chat(setup + [{'role': 'user', 'content': config.question}])
  return full, len(before)


def run(config: ml_collections.ConfigDict, model, *, model_path: Optional[str] = None,
        out_dir: Optional[str] = None) -> dict:
  """Detection, identification and false-positive rates per layer and strength."""
  del model_path, out_dir
  cfg, params, tok = model
  prompt, start = trial_prompt(tok, config)
  concepts = list(config.concepts)
  # One batch per strength: every concept's vector on its own rows, `samples` rows each.
  prompts = [prompt] * (len(concepts) * config.samples)
  owner = np.repeat(np.arange(len(concepts)), config.samples)
  results = {'layers': {}, 'strengths': list(config.strengths), 'concepts': concepts,
             'trials_per_cell': len(prompts), 'examples': {}}
  for layer in config.layers:
    site = f'blocks.{layer}.hook_resid_post'
    concept = concept_vectors(model, concepts, config.baseline_words, site,
                              config.concept_template)
    per_row = np.stack([concept[concepts[i]] for i in owner])
    rows = {}
    for strength in config.strengths:
      inject = steering.add(site, per_row, strength, steering.span('all', start=start),
                            per_row=True)
      out = gen.generate(params, cfg, prompts, max_new_tokens=config.max_new_tokens,
                         eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=config.temperature,
                         seed=config.seed, interventions=[inject])
      replies = [tok.decode(o, skip_special_tokens=True) for o in out]
      claims = np.asarray([claims_detection(r) for r in replies])
      named = np.asarray([mentions(r, concepts[i]) for r, i in zip(replies, owner)])
      rows[f'{strength:g}'] = {'claims_detection': float(claims.mean()),
                               'identifies': float((claims & named).mean()),
                               'mentions': float(named.mean())}
      results['examples'][f'{layer}/{strength:g}'] = replies[0]
    norms = [float(np.linalg.norm(v)) for v in concept.values()]
    results['layers'][layer] = {'site': site, 'vector_norm': float(np.mean(norms)), 'rows': rows}
  return results


def summary(results: dict) -> str:
  """The table of `run`'s results: per layer, a row per strength (0 = control)."""
  lines = [f"{results['trials_per_cell']} trials per cell ({len(results['concepts'])} concepts "
           f"x samples); strength 0 = control trials (its detection rate is the false-positive "
           f"rate)"]
  for layer, r in results['layers'].items():
    lines.append(f"{r['site']} (mean vector norm {r['vector_norm']:.1f})")
    lines.append(f"  {'strength':>8} {'detects':>8} {'identifies':>11} {'mentions':>9}")
    for strength, row in r['rows'].items():
      lines.append(f"  {strength:>8} {row['claims_detection']:>8.2f} {row['identifies']:>11.2f} "
                   f"{row['mentions']:>9.2f}")
  lines.append(f"replies for {results['concepts'][0]!r}:")
  for key, reply in results['examples'].items():
    lines.append(f'  [{key}] {reply!r}')
  return '\n'.join(lines)
