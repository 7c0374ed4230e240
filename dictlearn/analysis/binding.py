"""Entity binding: linear probes for entities' attributes, token by token, layer by layer.

Templated stories state an attribute of each of a few entities and then mention
one of them again:

    Alice is tall. Bob is short. Carol is happy. Dave is sad. Bob is

Every token carries up to three labels (an attribute class, or -1 where the
label is undefined):

    current   the attribute of the entity of the sentence the token is in, from
              that attribute's token to the sentence's full stop (before it, the
              attribute has not been said);
    prior     the attribute of the previous sentence's entity, at every token of
              sentences 2, 3, ... (information carried across the sentence boundary);
    queried   at the final " is", the attribute of the re-mentioned entity (which
              is never the last one stated, so recency does not answer it): the
              binding of a name to its attribute, looked up.

For each site, a logistic probe per label is trained on the activations of most
stories and scored on held-out stories (`dictlearn.analysis.probes`). Beside
the probes, the model's own answer: how often, at the final " is", its logit
ranks the queried entity's attribute first among the attributes. Run by
`dictlearn.analysis.reproduce` with `experiments/entity_binding.py`.
"""
import dataclasses
import logging

import jax.numpy as jnp
import numpy as np

from dictlearn.analysis import activations
from dictlearn.analysis import probes
from dictlearn.lm import llama

log = logging.getLogger(__name__)

LABELS = ('current', 'prior', 'queried')


@dataclasses.dataclass(frozen=True)
class Story:
  """One templated story: its token ids and a label per token for each of LABELS."""
  text: str
  tokens: list
  labels: dict  # {label: int32 (n,) attribute index or -1}


def make_stories(tokenizer, names, attributes, *, n_stories: int, n_entities: int,
                 seed: int) -> list[Story]:
  """Random templated stories with their per-token labels (see the module docstring).

  Raises:
    ValueError: fewer names than entities per story, fewer than two entities or
      attributes.
  """
  if n_entities < 2 or len(names) < n_entities or len(attributes) < 2:
    raise ValueError(f'Stories need at least two entities, as many names ({len(names)}) as '
                     f'entities ({n_entities}), and two attributes ({len(attributes)}).')
  rng = np.random.default_rng(seed)
  stories = []
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  for _ in range(n_stories):
    who = rng.choice(len(names), n_entities, replace=False)
    what = rng.integers(0, len(attributes), n_entities)
    asked = int(rng.integers(0, n_entities - 1))  # never the last entity stated
    tokens = list(bos)
    labels = {k: [-1] * len(bos) for k in LABELS}
    text = []

    def add(piece, **marks):
      ids = tokenizer.encode(piece)
      tokens.extend(ids)
      text.append(piece)
      for k in LABELS:
        labels[k].extend([marks.get(k, -1)] * len(ids))

    for i in range(n_entities):
      prior = int(what[i - 1]) if i else -1
      add(('' if i == 0 else ' ') + names[who[i]], prior=prior)
      add(' is', prior=prior)
      add(' ' + attributes[what[i]], current=int(what[i]), prior=prior)
      add('.', current=int(what[i]), prior=prior)
    add(' ' + names[who[asked]])
    add(' is', queried=int(what[asked]))
    stories.append(Story(''.join(text), tokens,
                         {k: np.asarray(v, np.int32) for k, v in labels.items()}))
  return stories


def model_answers(model, stories, attributes, *, batch_size: int) -> float:
  """How often the model's next-token logit at the final token ranks the queried
  attribute first among the attributes' (first) tokens."""
  cfg, params, tokenizer = model
  attribute_ids = jnp.asarray([tokenizer.encode(' ' + a)[0] for a in attributes])

  def fn(tokens, mask, indices):
    del indices
    logits, _ = llama.forward(params, cfg, tokens, attention_mask=mask)
    return {'logits': logits[..., attribute_ids]}

  logits = activations.map_batches(model, [s.tokens for s in stories], fn,
                                   batch_size=batch_size)['logits']
  right = [np.argmax(l[-1]) == s.labels['queried'][-1] for l, s in zip(logits, stories)]
  return float(np.mean(right))


def run(config, model, *, model_path: str, out_dir: str) -> dict:
  """The entity-binding experiment (see experiments/entity_binding.py)."""
  del model_path, out_dir  # no generated text, nothing saved beside the results
  stories = make_stories(model[2], config.names, config.attributes,
                         n_stories=config.n_stories, n_entities=config.n_entities,
                         seed=config.seed)
  acts = activations.read_activations(model, [s.tokens for s in stories], config.sites,
                                      batch_size=config.batch_size, progress=True)
  groups = np.concatenate([np.full(len(s.tokens), i) for i, s in enumerate(stories)])
  labels = {k: np.concatenate([s.labels[k] for s in stories]) for k in LABELS}
  per_site = {}
  for site in config.sites:
    x = np.concatenate(acts.pop(site))
    per_site[site] = {k: probes.fit_and_score(
        x, labels[k], groups, kind='logistic', n_classes=len(config.attributes),
        test_fraction=config.test_fraction, seed=config.seed, steps=config.probe_steps,
        learning_rate=config.learning_rate, l2=config.l2) for k in LABELS}
    log.info('%s: %s', site, {k: round(v['test'], 3) for k, v in per_site[site].items()})
  return {'example': stories[0].text, 'stories': len(stories),
          'model_answer_accuracy': model_answers(model, stories, config.attributes,
                                                 batch_size=config.batch_size),
          'chance': 1 / len(config.attributes), 'sites': per_site}


def summary(results: dict) -> str:
  """Held-out probe accuracy per site and label, as a table."""
  lines = [f'example story: {results["example"]!r}',
           f'{"site":<28}' + ''.join(f'{k:>10}' for k in LABELS)]
  for site, r in results['sites'].items():
    lines.append(f'{site:<28}' + ''.join(f'{r[k]["test"]:10.3f}' for k in LABELS))
  some = next(iter(results['sites'].values()))
  lines.append(f'{"held-out rows":<28}' + ''.join(f'{some[k]["n_test"]:10d}' for k in LABELS))
  lines.append(f'{"majority class":<28}' + ''.join(f'{some[k]["chance"]:10.3f}' for k in LABELS))
  lines.append(f'the model\'s own answer at the final " is" (argmax over the '
               f'attributes): {results["model_answer_accuracy"]:.3f} '
               f'(chance {results["chance"]:.3f}; {results["stories"]} stories)')
  return '\n'.join(lines)
