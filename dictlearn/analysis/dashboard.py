"""A static feature dashboard that opens from file:// with no server.

    python -m dictlearn.analysis.dashboard --workdir DIR --out SITE [--open]

Reads the statistics of `dictlearn.analysis.features` and writes:

    SITE/index.html, app.js, style.css    the viewer (no CDN, no fetch/XHR: data files are
                                          scripts that call DL.receive(name, data))
    SITE/density.svg                      log10 firing-frequency histogram of the dictionary
    SITE/data/meta.js, vocab.js           sizes, bin edges, token strings
    SITE/data/order_{index,freq,max}_K.js the index sorted three ways, ORDER_SHARD rows per
                                          file (each row: id, frequency, max, mean, description)
    SITE/data/feat_K.js                   FEATURE_SHARD features per file: histogram, contexts,
                                          logit lists
    SITE/data/tok_B.js                    inverted index: normalised token -> the features
                                          that fire on it or promote it, by FNV-1a bucket
    SITE/data/explains.js                 links to prompt explanations (`explain --html`)

A million features make about 5,000 files of a few MB at most; the browser loads
the meta, one order shard per page and one feature shard per feature viewed.
"""
import json
import os
import shutil
import sys
import webbrowser

import numpy as np
import tqdm

from dictlearn import cli
from dictlearn import logs
from dictlearn.analysis import statistics as stats_lib

ASSETS = os.path.join(os.path.dirname(__file__), 'dashboard_assets')
FEATURE_SHARD = 256
ORDER_SHARD = 1024
TOKEN_BUCKETS = 256
PAGE_SIZE = 50
_SEARCH_CAP = 200      # features listed per searched token
_TOKENS_PER_FEATURE = 3  # top tokens and promoted tokens indexed per feature


def token_bucket(key, buckets=TOKEN_BUCKETS):
  """FNV-1a over UTF-16 code units, modulo `buckets` (app.js computes the same)."""
  data = key.encode('utf-16-le')
  h = 0x811C9DC5
  for i in range(0, len(data), 2):
    h ^= data[i] | (data[i + 1] << 8)
    h = (h * 16777619) & 0xFFFFFFFF
  return h % buckets


def normalise(token):
  """The search key of a token string: stripped, lower case ('' for pure whitespace)."""
  return token.strip().lower()


def write_script(path, name, data, variable=None):
  """data/<name>.js: `DL.receive(name, data)` or, with `variable`, `DL.<variable> = data`."""
  text = json.dumps(data, separators=(',', ':'))
  with open(path, 'w', encoding='utf-8') as f:
    if variable:
      f.write(f'window.DL = window.DL || {{}}; DL.{variable} = {text};\n')
    else:
      f.write(f'DL.receive({json.dumps(name)}, {text});\n')


def density_svg(frequency, width=640, height=220, bins=48):
  """An SVG histogram of log10 firing frequency over the features that fired."""
  live = frequency[frequency > 0]
  dead = int(np.sum(frequency == 0))
  left, bottom, top_pad = 40, 30, 24
  inner_w, inner_h = width - left - 10, height - bottom - top_pad
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="15">{len(live)} live features, {dead} never fired; '
           'x: log10 firing frequency</text>']
  if len(live):
    logs = np.log10(live)
    lo, hi = np.floor(logs.min()), 0.0
    counts, edges = np.histogram(logs, bins=bins, range=(lo, hi))
    peak = max(1, counts.max())
    bw = inner_w / bins
    for i, c in enumerate(counts):
      h = inner_h * c / peak
      parts.append(f'<rect x="{left + i * bw:.1f}" y="{top_pad + inner_h - h:.1f}" '
                   f'width="{max(bw - 1, 1):.1f}" height="{h:.1f}" fill="#1565c0">'
                   f'<title>[{edges[i]:.2f}, {edges[i + 1]:.2f}): {c}</title></rect>')
    for tick in range(int(lo), 1):
      x = left + (tick - lo) / (hi - lo) * inner_w
      parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top_pad + inner_h}" '
                   f'y2="{top_pad + inner_h + 4}" stroke="black"/>'
                   f'<text x="{x - 6:.1f}" y="{height - 10}">{tick}</text>')
    parts.append(f'<text x="4" y="{top_pad + 10}">{peak}</text>')
  parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{top_pad + inner_h}" '
               f'y2="{top_pad + inner_h}" stroke="black"/></svg>')
  return '\n'.join(parts)


def _shard_features(stats, lo, hi, vocabulary):
  """(feature entries, index rows, search keys per feature) of features [lo, hi)."""
  read = lambda group, name: stats.rows(group, name, lo, hi)
  hist = read('statistics', 'hist')
  kind, values = read('contexts', 'kind'), read('contexts', 'values')
  tokens, acts = read('contexts', 'tokens'), read('contexts', 'acts')
  logits = ({name: read('logits', name) for name in ('promoted_ids', 'promoted_values',
                                                      'suppressed_ids', 'suppressed_values')}
            if stats.has_logits else None)
  centre = stats.window_before
  entries, rows, keys = [], [], []
  for j, i in enumerate(range(lo, hi)):
    contexts = []
    for e in np.nonzero(kind[j] >= 0)[0]:
      inside = tokens[j, e] >= 0
      first = int(np.argmax(inside))
      contexts.append([int(kind[j, e]), round(float(values[j, e]), 4), centre - first,
                       tokens[j, e][inside].tolist(),
                       np.round(acts[j, e][inside].astype(np.float64), 3).tolist()])
    top_centres = tokens[j, kind[j] == 0, centre]
    ids, counts = np.unique(top_centres[top_centres >= 0], return_counts=True)
    fires = ids[np.argsort(-counts, kind='stable')][:_TOKENS_PER_FEATURE].tolist()
    promoted = suppressed = []
    if logits is not None:
      promoted = [[int(t), round(float(v), 4)] for t, v in
                  zip(logits['promoted_ids'][j], logits['promoted_values'][j])]
      suppressed = [[int(t), round(float(v), 4)] for t, v in
                    zip(logits['suppressed_ids'][j], logits['suppressed_values'][j])]
    fire_text = [stats.token_string(int(t), vocabulary) for t in fires]
    promote_text = [stats.token_string(int(t), vocabulary) for t, _ in promoted[:_TOKENS_PER_FEATURE]]
    desc = 'fires on ' + (', '.join(json.dumps(s) for s in fire_text) or '-')
    if promote_text:
      desc += '; promotes ' + ', '.join(json.dumps(s) for s in promote_text)
    freq, mx, mean = (float(stats.frequency[i]), float(stats.max_activation[i]),
                      float(stats.mean_activation[i]))
    entries.append({'f': freq, 'c': int(stats.count[i]), 'm': round(mean, 4), 'x': round(mx, 4),
                    'h': hist[j].tolist(), 'ctx': contexts, 'p': promoted, 's': suppressed,
                    'd': desc})
    rows.append([i, freq, round(mx, 4), round(mean, 4), desc])
    keys.append({normalise(s) for s in fire_text + promote_text} - {''})
  return entries, rows, keys


def build_dashboard(source, out, *, progress=True):
  """Writes the static site for the statistics at `source`; returns index.html's path.

  Args:
    source: a run directory or its features directory.
    out: the site directory (created; files of an earlier build are replaced).
    progress: show a tqdm bar.

  Raises:
    FileNotFoundError: no finished statistics at `source`.
  """
  stats = stats_lib.load_statistics(source)
  vocabulary = stats.vocabulary()
  data = os.path.join(out, 'data')
  os.makedirs(data, exist_ok=True)
  for name in ('index.html', 'app.js', 'style.css'):
    shutil.copyfile(os.path.join(ASSETS, name), os.path.join(out, name))
  n = stats.n_latents
  index_rows, buckets = [None] * n, [dict() for _ in range(TOKEN_BUCKETS)]
  shards = range(0, n, FEATURE_SHARD)
  for lo in tqdm.tqdm(shards, desc='dashboard', unit='shard', file=sys.stderr,
                      disable=not progress):
    hi = min(lo + FEATURE_SHARD, n)
    entries, rows, keys = _shard_features(stats, lo, hi, vocabulary)
    write_script(os.path.join(data, f'feat_{lo // FEATURE_SHARD}.js'),
                 f'feat_{lo // FEATURE_SHARD}', entries)
    index_rows[lo:hi] = rows
    for i, feature_keys in zip(range(lo, hi), keys):
      for key in feature_keys:
        buckets[token_bucket(key)].setdefault(key, []).append(i)
  orders = {'index': np.arange(n),
            'freq': np.argsort(-stats.frequency, kind='stable'),
            'max': np.argsort(-stats.max_activation, kind='stable')}
  for key, order in orders.items():
    for k, lo in enumerate(range(0, n, ORDER_SHARD)):
      write_script(os.path.join(data, f'order_{key}_{k}.js'), f'order_{key}_{k}',
                   [index_rows[i] for i in order[lo:lo + ORDER_SHARD]])
  for b, table in enumerate(buckets):
    ranked = {key: [index_rows[i] for i in sorted(ids, key=lambda i: -stats.frequency[i])
                    [:_SEARCH_CAP]] for key, ids in table.items()}
    write_script(os.path.join(data, f'tok_{b}.js'), f'tok_{b}', ranked)
  with open(os.path.join(out, 'density.svg'), 'w', encoding='utf-8') as f:
    f.write(density_svg(stats.frequency))
  write_script(os.path.join(data, 'meta.js'), 'meta', {
      'n_latents': n, 'site': stats.site, 'model': stats.model,
      'architecture': stats.architecture, 'n_tokens': stats.n_tokens,
      'hist_edges': [float(e) if np.isfinite(e) else 1e308 for e in stats.hist_edges],
      'quantiles': int(stats.meta['options']['quantiles']), 'page_size': PAGE_SIZE,
      'feature_shard': FEATURE_SHARD, 'order_shard': ORDER_SHARD,
      'token_buckets': TOKEN_BUCKETS}, variable='meta')
  write_script(os.path.join(data, 'vocab.js'), 'vocab', vocabulary, variable='vocab')
  if not os.path.exists(os.path.join(data, 'explains.js')):
    write_script(os.path.join(data, 'explains.js'), 'explains', [], variable='explains')
  index = os.path.join(os.path.abspath(out), 'index.html')
  logs.stage('dashboard of %d features: %s', n, index)
  return index


def add_explain_link(out, href, title):
  """Lists a prompt explanation page in the site's header (data/explains.js)."""
  path = os.path.join(out, 'data', 'explains.js')
  links = []
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      text = f.read()
    links = json.loads(text[text.index('=', text.index('DL.explains')) + 1:].strip().rstrip(';'))
  links = [link for link in links if link['href'] != href] + [{'href': href, 'title': title}]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_script(path, 'explains', links, variable='explains')


def _parser():
  parser = cli.ArgumentParser(prog='python -m dictlearn.analysis.dashboard', description=__doc__)
  parser.add_argument('--workdir', required=True,
                      help="training run directory, a pipeline's directory, or a features/ "
                           'directory')
  parser.add_argument('--out', required=True, help='site directory to write')
  parser.add_argument('--open', action='store_true', help='open index.html in a browser')
  return parser


def _main(args):
  index = build_dashboard(args.workdir, args.out)
  print(f'file://{index}')
  if args.open:
    webbrowser.open(f'file://{index}')
  return 0


def main(argv=None):
  """python -m dictlearn.analysis.dashboard --workdir DIR --out SITE [--open]"""
  return cli.run_tool(_main, _parser(), argv)


if __name__ == '__main__':
  sys.exit(main())
