"""Explain a prompt: for each token, the features that fire most on it.

    python -m dictlearn.analysis.explain --workdir DIR --text "..." [--top 5] [--html SITE]

The prompt is tokenised and packed as the harvest packed its contexts (BOS
first), the language model the SAE's store came from runs to the SAE's site, the
activations are scaled by the run's data_scale and encoded with the SAE's
inference semantics (`encoding`, blocked over latents). The BOS position is left
out, as the harvest left it out of the store. With the run's feature statistics
(`dictlearn.analysis.features`), each feature gets a short description: the
tokens it fires hardest on and the tokens it promotes. `--html SITE` writes the
explanation as a page of the dashboard at SITE.
"""
import dataclasses
import html
import logging
import os
import re
import sys

import jax
import numpy as np

from dictlearn import cli
from dictlearn import lm
from dictlearn.analysis import dashboard
from dictlearn.analysis import encoding
from dictlearn.analysis import features
from dictlearn.analysis import statistics as stats_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Explanation:
  """The features of each token of a prompt.

  Attributes:
    tokens: [T] token ids (BOS first).
    text: [T] token strings.
    values: [T, n_top] float32 activations, largest first (0 where fewer fire).
    latents: [T, n_top] int32 feature indices (-1 where none).
    scored: [T] bool, False for the BOS position (not encoded, as in the store).
    descriptions: {feature: one-line description} when statistics exist, else {}.
  """
  tokens: np.ndarray
  text: list
  values: np.ndarray
  latents: np.ndarray
  scored: np.ndarray
  descriptions: dict


class Explainer:
  """A trained SAE with its language model, ready to explain prompts."""

  def __init__(self, workdir, *, step=None, lm_model=None, block_size=0):
    """Loads the run, its SAE (on one device) and its language model.

    Raises:
      FileNotFoundError: no checkpoint, or no store / model file where recorded.
      ValueError: the store records no language model (synthetic data).
    """
    self.run = features.open_run(workdir, step=step)
    manifest = self.run.manifest
    extra = manifest.get('extra') or {}
    if 'harvest' not in extra:
      raise ValueError(f'the store {self.run.reader.path} records no language model (synthetic '
                       'data): there is no prompt to explain; expected a harvested store')
    self.site, self.bos_id = manifest['site'], extra['bos_id']
    self.lm_cfg, self.lm_params, self.tokenizer = (
        lm_model or features.load_language_model(manifest))
    if self.lm_cfg.d_model != self.run.sae.d_model:
      raise ValueError(f'the language model has d_model={self.lm_cfg.d_model}; the SAE expects '
                       f'{self.run.sae.d_model}')
    mesh = encoding.latent_mesh(jax.devices()[:1])
    params, buffers = features.restore_params(self.run, mesh)
    self.encoder = encoding.make_encoder(self.run.sae)
    self.arrays = encoding.encoder_arrays(self.encoder, params, buffers)
    self.block_size = block_size or self.run.sae.block_size
    try:
      self.statistics = stats_lib.load_statistics(workdir)
    except FileNotFoundError:
      self.statistics = None
      log.info('no feature statistics in %s: explanations without descriptions', workdir)

  def encode_text(self, text):
    """BOS + the tokens of `text`, as the harvest packs a context."""
    return [self.bos_id] + self.tokenizer.encode(text, add_bos=False)

  def explain_tokens(self, tokens, n_top=5):
    """The top `n_top` features of each token of `tokens` (BOS first); see Explanation.

    Raises:
      ValueError: no tokens, or more than the model's context length.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 1 or not 1 <= len(tokens) <= self.lm_cfg.context_length:
      raise ValueError(f'expected 1 to {self.lm_cfg.context_length} token ids, got shape '
                       f'{tokens.shape}')
    _, acts = lm.forward(self.lm_params, self.lm_cfg, tokens[None], read_sites=[self.site],
                         return_logits=False)
    x = np.asarray(acts[self.site][0], np.float32) * np.float32(self.run.data_scale)
    values, latents = encoding.top_features(self.encoder, self.arrays, x, n_top,
                                            self.block_size)
    scored = tokens != self.bos_id
    values = np.where(scored[:, None], np.asarray(values), 0.0).astype(np.float32)
    latents = np.where(scored[:, None] & (values > 0), np.asarray(latents), -1).astype(np.int32)
    descriptions = {}
    if self.statistics is not None:
      vocabulary = self.statistics.vocabulary()
      for i in sorted(set(latents[latents >= 0].tolist())):
        descriptions[i] = self.statistics.describe(i, vocabulary=vocabulary)
    text = [self.tokenizer.decode([t]) for t in tokens.tolist()]
    return Explanation(tokens, text, values, latents, scored, descriptions)

  def explain(self, text, n_top=5):
    """`explain_tokens` of BOS + the tokens of `text`."""
    return self.explain_tokens(self.encode_text(text), n_top)


def format_text(explanation, n_top=3):
  """The explanation as lines of text: token, then its features with activations."""
  lines = []
  for t, token in enumerate(explanation.text):
    if not explanation.scored[t]:
      continue
    found = [(int(l), float(v)) for l, v in zip(explanation.latents[t], explanation.values[t])
             if l >= 0][:n_top]
    head = f'{t:4d} {token!r:>16}'
    if not found:
      lines.append(f'{head}   (no feature fires)')
    for j, (latent, value) in enumerate(found):
      desc = explanation.descriptions.get(latent, '')
      lines.append(f'{head if j == 0 else " " * len(head)}   #{latent:<7d} {value:7.2f}  {desc}')
  return '\n'.join(lines)


def write_html(explanation, site, title):
  """Writes the explanation as a page of the dashboard at `site`; returns its path.

  The page needs no script: each token is shaded by its strongest feature and links
  to its row, each feature links to its dashboard view (index.html#f=N).
  """
  slug = re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')[:40] or 'prompt'
  name = f'explain-{slug}.html'
  peak = float(explanation.values.max()) or 1.0
  esc = lambda s: html.escape(s, quote=True)
  strip, rows = [], []
  for t, token in enumerate(explanation.text):
    top = float(explanation.values[t, 0]) if explanation.scored[t] else 0.0
    shown = esc(token.replace('\n', '\u23ce'))
    strip.append(f'<a class="tok" href="#t{t}" title="{top:.3f}" style="background: rgba(239, '
                 f'108, 0, {min(1.0, top / peak):.3f})">{shown}</a>')
    cells = []
    for latent, value in zip(explanation.latents[t], explanation.values[t]):
      if latent >= 0:
        desc = esc(explanation.descriptions.get(int(latent), ''))
        cells.append(f'<a href="index.html#f={latent}">#{latent}</a> {value:.2f} '
                     f'<span class="muted">{desc}</span>')
    if not explanation.scored[t]:
      feats = '<span class="muted">BOS: not encoded (left out of the store too)</span>'
    else:
      feats = '<br>'.join(cells) or '<span class="muted">no feature fires</span>'
    rows.append(f'<tr id="t{t}"><td>{t}</td><td class="context">{shown}</td><td>{feats}</td></tr>')
  page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="style.css"></head>
<body><header><h1><a href="index.html">dictlearn</a></h1><span>Explain: {esc(title)}</span></header>
<main><h2>Tokens, shaded by their strongest feature (click one for its features)</h2>
<div class="context">{''.join(strip)}</div>
<h2>Features per token</h2>
<table class="index"><thead><tr><th>#</th><th>token</th><th>features (activation, description)</th>
</tr></thead><tbody>{''.join(rows)}</tbody></table></main></body></html>
"""
  os.makedirs(site, exist_ok=True)
  path = os.path.join(site, name)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(page)
  dashboard.add_explain_link(site, name, title)
  return path


def _parser():
  parser = cli.ArgumentParser(prog='python -m dictlearn.analysis.explain', description=__doc__)
  parser.add_argument('--workdir', required=True,
                      help="training run directory (or a pipeline's directory: its run is sae/)")
  parser.add_argument('--text', required=True, help='the prompt')
  parser.add_argument('--top', type=int, default=5, help='features per token')
  parser.add_argument('--html', default=None, help='dashboard site to add the page to')
  return parser


def _main(args):
  explanation = Explainer(args.workdir).explain(args.text, args.top)
  print(format_text(explanation, args.top))
  if args.html:
    print(f'file://{os.path.abspath(write_html(explanation, args.html, args.text[:60]))}')
  return 0


def main(argv=None):
  """python -m dictlearn.analysis.explain --workdir DIR --text "..." [--top N] [--html SITE]"""
  return cli.run_tool(_main, _parser(), argv)


if __name__ == '__main__':
  sys.exit(main())
