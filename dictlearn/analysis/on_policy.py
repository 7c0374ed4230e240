"""On-policy recognition: the model's next-token entropy on its own replies and another's.

A model reading text it would itself have written is, token by token, surer of
what comes next than on text from another source. Each prompt's replies (the
model's sampled and greedy replies, and one written elsewhere) are read in the
assistant turn of the chat; at each reply token the entropy of the model's
next-token distribution and the negative log-likelihood of the actual token are
kept. Replies of one prompt are cut to a common length so that every source is
measured over the same positions. Run by `dictlearn.analysis.reproduce` with
`experiments/on_policy.py`.
"""
import dataclasses
import logging

import numpy as np

from dictlearn.analysis import activations
from dictlearn.analysis import texts as texts_lib

log = logging.getLogger(__name__)

OFF = 'another source'


def source_name(temperature: float, top_p: float) -> str:
  """How a model source is named in the results."""
  if temperature == 0:
    return 'model, greedy'
  return f'model, T={temperature:g}' + (f' top-p {top_p:g}' if top_p < 1 else '')


def reply_stats(model, chats, replies, *, batch_size: int = 4) -> list[dict]:
  """Per-token entropy and NLL over each reply's own tokens, read after its chat.

  Returns:
    One {'entropy': (m,), 'nll': (m,)} per reply, m its token count: at reply
    token j, the distribution that predicted it.
  """
  tokens, starts = activations.encode_replies(model[2], chats, replies)
  stats = activations.next_token_stats(model, tokens, batch_size=batch_size)
  out = []
  for i, start in enumerate(starts):
    span = slice(start - 1, len(tokens[i]) - 1)  # the positions that predict the reply
    out.append({k: stats[k][i][span] for k in ('entropy', 'nll')})
  return out


def run(config, model, *, model_path: str, out_dir: str) -> dict:
  """The on-policy experiment (see experiments/on_policy.py); returns its figures."""
  del out_dir  # nothing to save beside the results
  prompts, off = list(config.prompts), list(config.off_policy)
  if len(prompts) != len(off):
    raise ValueError(f'config.prompts has {len(prompts)} prompts but config.off_policy '
                     f'{len(off)} replies; expected one off-policy reply per prompt.')
  base = texts_lib.Sampling.from_config(config.sampling)
  sources = {}
  for temperature, top_p in config.on_policy:
    sampling = dataclasses.replace(base, temperature=temperature,
                                   top_p=top_p if temperature > 0 else 1.0)
    sources[source_name(temperature, top_p)] = texts_lib.model_replies(
        model, prompts, sampling, model_path=model_path, cache_dir=config.cache_dir)
  on_names = list(sources)
  sources[OFF] = off
  # A prompt the model answered with nothing has no on-policy tokens to compare.
  kept = [i for i in range(len(prompts)) if all(s[i].strip() for s in sources.values())]
  if not kept:
    raise ValueError('Every prompt has an empty model reply; nothing to compare.')
  stats = {name: reply_stats(model, [prompts[i] for i in kept], [s[i] for i in kept],
                             batch_size=config.batch_size)
           for name, s in sources.items()}
  per_prompt = {name: [] for name in sources}
  for j in range(len(kept)):
    n = min(config.max_tokens, *(len(stats[name][j]['entropy']) for name in sources))
    for name in sources:
      per_prompt[name].append({k: float(np.mean(v[:n])) for k, v in stats[name][j].items()} |
                              {'tokens': n})
  figures = {}
  for name, rows in per_prompt.items():
    weights = np.array([r['tokens'] for r in rows], np.float64)
    figures[name] = {k: float(np.average([r[k] for r in rows], weights=weights))
                     for k in ('entropy', 'nll')} | {'tokens': int(weights.sum())}
    figures[name]['nll_minus_entropy'] = figures[name]['nll'] - figures[name]['entropy']
  off_entropy = np.array([r['entropy'] for r in per_prompt[OFF]])
  results = {'prompts': len(kept), 'sources': figures, 'ratio': {}, 'off_higher': {}}
  for name in on_names:
    on_entropy = np.array([r['entropy'] for r in per_prompt[name]])
    results['ratio'][name] = figures[OFF]['entropy'] / figures[name]['entropy']
    results['off_higher'][name] = int(np.sum(off_entropy > on_entropy))
  results['examples'] = {name: s[kept[0]] for name, s in sources.items()}
  return results


def summary(results: dict) -> str:
  """The results as a table."""
  lines = [f'{"source":<28} {"entropy":>9} {"NLL":>9} {"NLL-entropy":>12} {"tokens":>7}']
  for name, f in results['sources'].items():
    lines.append(f'{name:<28} {f["entropy"]:9.3f} {f["nll"]:9.3f} {f["nll_minus_entropy"]:12.3f} '
                 f'{f["tokens"]:7d}')
  for name, ratio in results['ratio'].items():
    lines.append(f'entropy ratio {OFF} / {name}: {ratio:.2f} (off-policy higher on '
                 f'{results["off_higher"][name]} of {results["prompts"]} prompts)')
  return '\n'.join(lines)
