"""Stage 2 of the feature statistics: each latent's contexts, rebuilt from the store.

For each latent, `choose_contexts` picks rows (its top rows, then a few samples from
each activation-quantile bucket); each row gets a window of tokens within its
document, and each window token the latent's activation there: for TopK a lookup
in the codes the pass saved (exactly what was selected), for the threshold
architectures x . W_enc[:, l] + b_enc[l] recomputed per (row, latent) pair, the
pairs sorted by row so the store is read in order.
"""
import os
import sys

import jax
import numpy as np
import tqdm

from dictlearn.analysis import encoding
from dictlearn.analysis import zarr_io

_CONTEXT_PAIRS = 1 << 24   # (row, latent) pairs of one chunk of latents
_PAIR_BLOCK = 1 << 15      # pairs per call of the pairwise encoder


def choose_contexts(stats, options):
  """(rows, kind, values) [n, E]: the top rows, then samples from each quantile bucket."""
  n = len(stats['count'])
  rows = np.full((n, options.n_contexts), -1, np.int32)
  kind = np.full((n, options.n_contexts), -1, np.int8)
  values = np.zeros((n, options.n_contexts), np.float32)
  top = min(options.contexts_top, stats['top_rows'].shape[1])
  rows[:, :top] = stats['top_rows'][:, :top]
  values[:, :top] = stats['top_values'][:, :top]
  kind[:, :top] = np.where(rows[:, :top] >= 0, 0, -1)
  per = options.contexts_per_quantile
  for q in range(1, options.quantiles + 1):
    mask = stats['sample_bucket'] == q  # samples in priority order: a uniform pick
    rank = np.cumsum(mask, axis=1) - 1
    latent, j = np.nonzero(mask & (rank < per))
    slot = options.contexts_top + (q - 1) * per + rank[latent, j]
    rows[latent, slot] = stats['sample_rows'][latent, j]
    values[latent, slot] = stats['sample_values'][latent, j]
    kind[latent, slot] = q
  return rows, kind, values


def _context_windows(centres, doc, n_rows, options):
  """Window rows [.., W] around `centres`, and where they are in the centre's document."""
  offsets = np.arange(-options.window_before, options.window_after + 1)
  rows = centres[..., None].astype(np.int64) + offsets
  inside = (centres[..., None] >= 0) & (rows >= 0) & (rows < n_rows)
  safe = np.clip(rows, 0, n_rows - 1)
  inside &= doc[safe] == doc[np.clip(centres, 0, n_rows - 1)][..., None]
  return safe, inside


def _pair_activations(run, encoder, arrays, codes, rows, latents):
  """Activation of latent latents[p] at store row rows[p] (for the threshold
  architectures, rows sorted ascending: the store is read in order)."""
  out = np.zeros(len(rows), np.float32)
  if encoder.top_k:  # exactly what the pass selected: a lookup in the row's TopK code
    for start in range(0, len(rows), _PAIR_BLOCK):
      r, l = rows[start:start + _PAIR_BLOCK], latents[start:start + _PAIR_BLOCK]
      match = codes['latents'][r] == l[:, None]
      out[start:start + len(r)] = np.where(match, codes['values'][r], 0.0).sum(axis=1)
    return out
  theta = np.asarray(jax.device_get(arrays['theta']))
  for start in range(0, len(rows), _PAIR_BLOCK):
    r, l = rows[start:start + _PAIR_BLOCK], latents[start:start + _PAIR_BLOCK]
    lo, hi = int(r[0]), int(r[-1]) + 1
    x = np.asarray(run.reader.read_rows(lo, hi), np.float32)[r - lo] * np.float32(run.data_scale)
    pad = _PAIR_BLOCK - len(r)
    pre = np.asarray(encoding.pair_preactivations(
        encoder, arrays, np.pad(x, ((0, pad), (0, 0))), np.pad(l, (0, pad))))[:len(r)]
    out[start:start + len(r)] = np.where(pre > theta[l], pre, 0.0)
  return out


def run_contexts(run, out, arrays, stats, options, progress, save_progress, n_rows):
  """Stage 2 of `features.compute_statistics`: contexts/ for every latent, in chunks;
  `progress['contexts_done']` (saved by `save_progress()` after each) is where it resumes."""
  encoder = encoding.make_encoder(run.sae)
  n = encoder.n_latents
  rows, kind, values = choose_contexts(stats, options)
  if progress['contexts_done'] == 0:
    zarr_io.write(os.path.join(out, 'contexts', 'rows'), rows)
    zarr_io.write(os.path.join(out, 'contexts', 'kind'), kind)
    zarr_io.write(os.path.join(out, 'contexts', 'values'), values)
    shape = (n, options.n_contexts, options.window)
    zarr_io.create(os.path.join(out, 'contexts', 'tokens'), shape, np.int32, 256, -1)
    zarr_io.create(os.path.join(out, 'contexts', 'acts'), shape, np.float32, 256)
  tokens_out = zarr_io.open_array(os.path.join(out, 'contexts', 'tokens'))
  acts_out = zarr_io.open_array(os.path.join(out, 'contexts', 'acts'))
  tokens = np.asarray(run.reader.read_tokens(0, n_rows))
  doc = np.asarray(run.reader.read_doc(0, n_rows))
  codes = ({name: zarr_io.read(os.path.join(out, 'codes', name))
            for name in ('values', 'latents')} if encoder.top_k else None)
  chunk = max(1, _CONTEXT_PAIRS // (options.n_contexts * options.window))
  starts = range(progress['contexts_done'], n, chunk)
  for start in tqdm.tqdm(starts, desc='contexts', unit='chunk', file=sys.stderr,
                         disable=not options.progress):
    stop = min(start + chunk, n)
    window, inside = _context_windows(rows[start:stop], doc, n_rows, options)
    latent = np.broadcast_to(np.arange(start, stop)[:, None, None], window.shape)[inside]
    pair_rows = window[inside]
    order = (slice(None) if encoder.top_k  # a lookup: any order; otherwise the store's order
             else np.argsort(pair_rows, kind='stable'))
    flat = np.zeros(len(pair_rows), np.float32)
    flat[order] = _pair_activations(run, encoder, arrays, codes, pair_rows[order], latent[order])
    acts = np.zeros(window.shape, np.float32)
    acts[inside] = flat
    # The centre's value exactly as the pass recorded it.
    acts[:, :, options.window_before] = np.where(rows[start:stop] >= 0, values[start:stop], 0)
    tokens_out[start:stop].write(np.where(inside, tokens[window], -1).astype(np.int32)).result()
    acts_out[start:stop].write(np.where(inside, acts, np.nan).astype(np.float32)).result()
    progress['contexts_done'] = stop
    save_progress()
