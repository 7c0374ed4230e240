"""Reading feature statistics written by `dictlearn.analysis.features`.

    stats = load_statistics('runs/smollm2/sae')      # or the features/ directory itself
    stats.frequency, stats.mean_activation, stats.max_activation   # numpy [n_latents]
    stats.feature(123)        # one feature: histogram, top rows, contexts, logit lists

Activations are in the SAE's own units (store rows times the run's data_scale),
the units `sae.encode` sees; `max_activation` is the largest over the pass's rows.
"""
import functools
import os

import numpy as np

from dictlearn.analysis import zarr_io
from dictlearn.lm import gguf as gguf_lib
from dictlearn.lm.tokenizer import Tokenizer

RESULT = 'features.json'
CONTEXT_KINDS = ('top',)  # kind 0; kinds q >= 1 are 'quantile q'


class FeatureIndexError(IndexError, ValueError):
  """A feature index outside [0, n_latents)."""


def resolve(path):
  """The features directory of a run directory (or of a pipeline's, whose run is sae/),
  or `path` itself when it is one.

  Raises:
    FileNotFoundError: neither holds features.json.
  """
  path = os.path.abspath(path)
  for candidate in (path, os.path.join(path, 'features'), os.path.join(path, 'sae', 'features')):
    if os.path.isfile(os.path.join(candidate, RESULT)):
      return candidate
  progress = any(os.path.isfile(os.path.join(c, 'progress.json'))
                 for c in (path, os.path.join(path, 'features')))
  raise FileNotFoundError(
      f'no feature statistics in {path}' + (' (a pass was started and did not finish: '
                                              'run it again to resume)' if progress else '')
      + f'; expected {os.path.join(path, "features", RESULT)}: run '
      f'python -m dictlearn.analysis.features --workdir {path}')


class FeatureStatistics:
  """The statistics of one SAE's features.

  Attributes:
    directory: the features directory.
    meta: features.json (what was computed, from which run, store and model).
    n_latents, site, model, architecture, n_tokens, data_scale: from `meta`.
    frequency: [n] firing frequency over the pass's rows.
    mean_activation: [n] mean activation over the rows where the feature fires.
    max_activation: [n] largest activation.
    count: [n] rows where it fires.
    hist_edges: [HIST_BINS + 1] activation histogram bin edges (0 first, inf last).
  """

  def __init__(self, directory):
    self.directory = resolve(directory)
    self.meta = zarr_io.read_json(os.path.join(self.directory, RESULT))
    self.n_latents = int(self.meta['n_latents'])
    self.site, self.model = self.meta['site'], self.meta['model']
    self.architecture = self.meta['architecture']
    self.n_tokens = int(self.meta['n_tokens'])
    self.data_scale = float(self.meta['data_scale'])
    self.has_logits = bool(self.meta['has_logits'])
    self.window_before = int(self.meta['options']['window_before'])
    self.hist_edges = np.asarray(self.meta['hist_edges'], np.float64)
    for name in ('frequency', 'mean_activation', 'max_activation', 'count'):
      setattr(self, name, self._read('statistics', name))

  def _path(self, *parts):
    return os.path.join(self.directory, *parts)

  def _read(self, *parts):
    return zarr_io.read(self._path(*parts))

  @functools.cache
  def _array(self, *parts):
    return zarr_io.open_array(self._path(*parts))

  def rows(self, group, name, lo, hi):
    """Rows [lo, hi) of one result array (e.g. ('contexts', 'acts')), as numpy."""
    return np.asarray(self._array(group, name)[lo:hi].read().result())

  def check_index(self, index):
    """`index` as an int in [0, n_latents).

    Raises:
      FeatureIndexError: anything else.
    """
    try:
      i = int(index)
    except (TypeError, ValueError) as e:
      raise FeatureIndexError(f'feature index {index!r} is not an integer') from e
    if not 0 <= i < self.n_latents or i != index:
      raise FeatureIndexError(f'feature index {index} out of range: this SAE has '
                              f'{self.n_latents} features, indices 0 to {self.n_latents - 1}')
    return i

  @functools.cache
  def vocabulary(self):
    """Token strings by id (the store's language model's tokenizer), or None."""
    path = self.meta.get('language_model')
    if not path or not os.path.isfile(path):
      return None
    tokenizer = Tokenizer.from_gguf(gguf_lib.open_gguf(path))
    return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]

  def token_string(self, token_id, vocabulary=None):
    vocabulary = self.vocabulary() if vocabulary is None else vocabulary
    if token_id < 0:
      return ''
    if vocabulary is None or token_id >= len(vocabulary):
      return f'<{token_id}>'
    return vocabulary[token_id]

  def feature(self, index, *, vocabulary=None):
    """Everything about one feature, as plain Python values.

    Returns:
      {'index', 'frequency', 'mean_activation', 'max_activation', 'count',
       'histogram': {'edges', 'counts'}, 'top': [(value, row)],
       'contexts': [{'kind', 'quantile', 'row', 'value', 'tokens': [id], 'text':
       [str], 'acts': [float]}] (only the window inside the row's document; the
       row itself at position 'centre'), 'promoted'/'suppressed': [(id, str,
       value)] (empty without a language model)}.

    Raises:
      FeatureIndexError: an index out of range.
    """
    i = self.check_index(index)
    vocabulary = self.vocabulary() if vocabulary is None else vocabulary
    out = {'index': i, 'frequency': float(self.frequency[i]),
           'mean_activation': float(self.mean_activation[i]),
           'max_activation': float(self.max_activation[i]), 'count': int(self.count[i]),
           'histogram': {'edges': self.hist_edges.tolist(),
                         'counts': self.rows('statistics', 'hist', i, i + 1)[0].tolist()}}
    values = self.rows('statistics', 'top_values', i, i + 1)[0]
    rows = self.rows('statistics', 'top_rows', i, i + 1)[0]
    out['top'] = [(float(v), int(r)) for v, r in zip(values, rows) if r >= 0]
    out['contexts'] = self.contexts(i, vocabulary=vocabulary)
    out.update(self.logits(i, vocabulary=vocabulary))
    return out

  def contexts(self, index, *, vocabulary=None):
    """The contexts of one feature (see `feature`)."""
    i = self.check_index(index)
    rows = self.rows('contexts', 'rows', i, i + 1)[0]
    kind = self.rows('contexts', 'kind', i, i + 1)[0]
    values = self.rows('contexts', 'values', i, i + 1)[0]
    tokens = self.rows('contexts', 'tokens', i, i + 1)[0]
    acts = self.rows('contexts', 'acts', i, i + 1)[0]
    out = []
    for e in np.nonzero(kind >= 0)[0]:
      inside = tokens[e] >= 0
      first = int(np.argmax(inside))
      ids = tokens[e][inside].tolist()
      out.append({'kind': 'top' if kind[e] == 0 else 'quantile', 'quantile': int(kind[e]),
                  'row': int(rows[e]), 'value': float(values[e]), 'tokens': ids,
                  'text': [self.token_string(t, vocabulary) for t in ids],
                  'acts': [float(a) for a in acts[e][inside]],
                  'centre': self.window_before - first})
    return out

  def logits(self, index, *, vocabulary=None):
    """{'promoted': [(id, str, value)], 'suppressed': [...]} (empty lists without a model)."""
    i = self.check_index(index)
    out = {'promoted': [], 'suppressed': []}
    if not self.has_logits:
      return out
    for way in out:
      ids = self.rows('logits', f'{way}_ids', i, i + 1)[0]
      values = self.rows('logits', f'{way}_values', i, i + 1)[0]
      out[way] = [(int(t), self.token_string(t, vocabulary), float(v))
                  for t, v in zip(ids, values)]
    return out

  def describe(self, index, *, vocabulary=None, n=4):
    """A one-line description: the tokens it fires hardest on, the tokens it promotes."""
    i = self.check_index(index)
    rows = self.rows('contexts', 'tokens', i, i + 1)[0]
    kind = self.rows('contexts', 'kind', i, i + 1)[0]
    centres = rows[kind == 0, self.window_before]
    ids, counts = np.unique(centres[centres >= 0], return_counts=True)
    top = ids[np.argsort(-counts, kind='stable')][:n]
    fires = ', '.join(repr(self.token_string(t, vocabulary)) for t in top) or '-'
    text = f'fires on {fires}'
    if self.has_logits:
      promoted = self.logits(i, vocabulary=vocabulary)['promoted'][:n]
      text += '; promotes ' + ', '.join(repr(s) for _, s, _ in promoted)
    return text

  def summary(self):
    """A few lines about the whole dictionary."""
    f = self.frequency
    dead = float(np.mean(f == 0))
    live = f[f > 0]
    median = float(np.median(live)) if live.size else 0.0
    return '\n'.join([
        f'{self.n_latents} features of a {self.architecture} SAE on {self.site} of '
        f'{self.model}, over {self.n_tokens:,} tokens ({self.directory})',
        f'  never fired {dead:.3f}   median frequency of the others {median:.2e}   '
        f'densest {float(f.max()):.3f}   max activation up to '
        f'{float(self.max_activation.max()):.2f}',
    ])


def load_statistics(workdir_or_features_dir):
  """The FeatureStatistics of a run directory or of a features directory.

  Raises:
    FileNotFoundError: no finished statistics there (the message says how to make them).
  """
  return FeatureStatistics(workdir_or_features_dir)
