"""Feature statistics: one streaming pass of a trained SAE over an activation store.

    python -m dictlearn.analysis.features --workdir DIR [--store PATH] [--tokens N]

For every latent: firing frequency, mean (over firing rows) and max activation, an
activation histogram over fixed log2 bins, the top-N activating rows, a uniform
sample of its firing rows bucketed by activation quantile, the contexts of those
rows rebuilt from the store (a window of tokens within the same document, each
with the latent's activation), and the output tokens its decoder direction
promotes and suppresses through the model's final norm and unembedding.
Activations are in the SAE's own units: store rows times the run's `data_scale`.

Stages, each resumable (a killed run started again with the same command ends
with the results an uninterrupted one gives):

    pass      batches of store rows in order; the running state (`encoding`) is
              saved every `save_every` batches / `save_seconds` into one of two
              slots, progress.json naming the good one (written last)
    contexts  latents in chunks: windows around the chosen rows; activations
              from the pass's TopK codes, or recomputed per (row, latent) pair
    logits    latents in blocks: W_dec[l] * final_norm @ W_U, top and bottom

Output, <workdir>/features/ (zarr3 arrays chunked along the latent axis):

    features.json            written last: what was computed, from what
    statistics/              count, act_sum, hist [n, HIST_BINS], hist_edges,
                             top_values/top_rows [n, top_n], sample_values/
                             sample_rows/sample_bucket [n, n_samples]
    contexts/                rows, kind, values [n, E]; tokens, acts [n, E, W]
                             (kind 0: a top row; q = 1..quantiles: a sample from
                             the q-th activation quantile, 1 lowest; -1: none)
    logits/                  promoted_ids/_values, suppressed_ids/_values [n, n_logits]
    codes/ state/ progress.json   working files of the pass
"""
import dataclasses
import logging
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import tqdm

from dictlearn import cli
from dictlearn import harvest
from dictlearn import lm
from dictlearn import logs
from dictlearn import sharding as sharding_lib
from dictlearn.analysis import contexts as contexts_lib
from dictlearn.analysis import encoding
from dictlearn.analysis import logits as logits_lib
from dictlearn.analysis import zarr_io
# The reading side, re-exported: the public contract other analyses code against.
from dictlearn.analysis.statistics import FeatureStatistics  # noqa: F401  pylint: disable=unused-import
from dictlearn.analysis.statistics import load_statistics
from dictlearn.data import store as store_lib
from dictlearn.sae import make_sae
from dictlearn.train import checkpoint as ckpt_lib

log = logging.getLogger(__name__)

FORMAT = 'dictlearn.features'
VERSION = 1
RESULT = 'features.json'
PROGRESS = 'progress.json'
_RULES = (('batch', 'data'), ('latent', 'model'), ('embed', None))


@dataclasses.dataclass(frozen=True)
class Options:
  """What the statistics pass computes and how it runs.

  Attributes:
    batch_size: store rows per step (0: the run's train.batch_size).
    tokens: store rows read from the start (0: all of them).
    block_size: latents per block within a device (0: sae.encoder_block_size, or
      all of a device's latents when that is 0).
    top_n: top activating rows kept per latent.
    n_samples: firing rows sampled per latent (priority sampling).
    quantiles: activation-quantile buckets of the samples.
    contexts_top: top rows shown as contexts.
    contexts_per_quantile: samples shown per quantile bucket.
    window_before, window_after: tokens of context around a row.
    n_logits: promoted and suppressed tokens kept per latent.
    save_every: save the pass state every this many batches (0: by time only).
    save_seconds: and at least this often.
    progress: show tqdm bars.
  """
  batch_size: int = 0
  tokens: int = 0
  block_size: int = 0
  top_n: int = 16
  n_samples: int = 32
  quantiles: int = 4
  contexts_top: int = 10
  contexts_per_quantile: int = 3
  window_before: int = 10
  window_after: int = 4
  n_logits: int = 12
  save_every: int = 0
  save_seconds: float = 300.0
  progress: bool = True

  @property
  def n_contexts(self):
    return self.contexts_top + self.quantiles * self.contexts_per_quantile

  @property
  def window(self):
    return self.window_before + 1 + self.window_after


# ---------------------------------------------------------------------------
# The run: checkpoint, store, model
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A trained SAE and the store it reads: what every analysis starts from."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  run_info: dict
  sae: object
  reader: store_lib.StoreReader

  @property
  def manifest(self):
    return self.reader.manifest

  @property
  def data_scale(self):
    return float(self.run_info['data_scale'])


def _open_store(path, what):
  try:
    return store_lib.StoreReader(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{what}: no activation store at {path} (manifest.json missing); '
                            'expected the harvested store the SAE was trained on: pass '
                            '--store PATH if it moved') from e


def check_store_matches(manifest, trained_manifest, d_model, store, trained_store):
  """Raises ValueError when a store is not of the site, model and width the SAE saw."""
  if manifest['d_model'] != d_model:
    raise ValueError(f'store {store} has d_model={manifest["d_model"]}; the SAE was trained '
                     f'on d_model={d_model} (store {trained_store})')
  if trained_manifest is None:
    log.warning('the store the SAE was trained on (%s) is gone: cannot check that %s holds the '
                'same site and model', trained_store, store)
    return
  for key in ('site', 'model'):
    if manifest.get(key) != trained_manifest.get(key):
      raise ValueError(
          f'store {store} holds {key} {manifest.get(key)!r}; the SAE was trained on {key} '
          f'{trained_manifest.get(key)!r} (store {trained_store}); pass a store harvested at '
          'the same site of the same model')


def open_run(workdir, *, store=None, step=None):
  """Reads a training run's checkpoint metadata and opens its store.

  Args:
    workdir: the training run directory (holds checkpoints/).
    store: another store to read (same site, model and d_model), or None for the run's.
    step: checkpoint step, or None for the latest.

  Raises:
    FileNotFoundError: no checkpoint, or no store where the run says.
    ValueError: `store` is of another site, model or width than the SAE's.
  """
  workdir = ckpt_lib.run_directory(workdir)
  step, config, run_info = ckpt_lib.read_metadata(ckpt_lib.checkpoint_dir(workdir), step)
  config = ml_collections.ConfigDict(config)
  if store is None:
    try:
      trained_store = ckpt_lib.recorded_store(run_info, workdir)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'{e}; or pass --store PATH: the same store where it is now') from e
    reader = _open_store(trained_store, f'checkpoint step {step} of {workdir}')
  else:
    reader = _open_store(store, '--store')
    trained_store = run_info['store']
    try:
      trained_store = ckpt_lib.recorded_store(run_info, workdir)
      trained_manifest, _ = store_lib.read_status(trained_store)
    except FileNotFoundError:
      trained_manifest = None
    check_store_matches(reader.manifest, trained_manifest, run_info['d_model'], store,
                        trained_store)
  if reader.d_model != run_info['d_model']:
    raise ValueError(f'store {reader.path} has d_model={reader.d_model}; the SAE expects '
                     f'{run_info["d_model"]}')
  sae = make_sae(config.sae, run_info['d_model'])
  return Run(os.path.abspath(workdir), step, config, run_info, sae, reader)


def restore_params(run, mesh):
  """The SAE's params and buffers, latents split over the mesh axis 'model'."""
  param_axes, buffer_axes = run.sae.logical_axes()
  shardings = sharding_lib.logical_shardings(mesh, {'params': param_axes,
                                                    'buffers': buffer_axes}, _RULES)
  _, params, buffers = ckpt_lib.restore_sae(ckpt_lib.checkpoint_dir(run.workdir), run.step,
                                            shardings)
  return params, buffers


def language_model_path(manifest):
  """The model (GGUF file or Hugging Face directory) a harvested store came from, or None
  (synthetic data); see `harvest.harvested_model_path`."""
  return harvest.harvested_model_path(manifest)


def load_language_model(manifest, with_tokenizer=True):
  """(cfg, params, tokenizer) of the model a harvested store came from, or None."""
  path = language_model_path(manifest)
  if path is None:
    return None
  return lm.load_model(path, with_tokenizer=with_tokenizer)


def features_dir(workdir):
  """Where the statistics of a run go: <workdir>/features."""
  return os.path.join(os.path.abspath(workdir), 'features')


# ---------------------------------------------------------------------------
# Stage 1: the streaming pass
# ---------------------------------------------------------------------------


def _identity(run, options, n_rows, batch_size):
  return {'format': FORMAT, 'version': VERSION, 'checkpoint_step': run.step,
          'store': run.reader.path, 'n_rows': n_rows, 'batch_size': batch_size,
          'hist_bins': encoding.HIST_BINS, 'architecture': run.sae.name,
          'n_latents': run.sae.n_latents,
          **{k: v for k, v in dataclasses.asdict(options).items()
             if k not in ('batch_size', 'tokens', 'block_size', 'save_every', 'save_seconds',
                          'progress')}}


def _load_progress(out, identity):
  progress = zarr_io.read_json(os.path.join(out, PROGRESS))
  if progress is None:
    return None
  if progress['identity'] != identity:
    changed = [f'{k}: was {progress["identity"].get(k)!r}, now {v!r}'
               for k, v in identity.items() if progress['identity'].get(k) != v]
    raise ValueError(f'{out} holds an unfinished statistics pass with other settings '
                     f'({"; ".join(changed)}); rerun with the same ones, or remove {out} '
                     '(or pass --restart) to start over')
  return progress


def _save_state(out, state, progress):
  slot = 1 - progress.get('slot', 1)
  host = jax.device_get(state)
  for name, value in host.items():
    zarr_io.write(os.path.join(out, 'state', str(slot), name), value)
  progress['slot'] = slot
  zarr_io.write_json(os.path.join(out, PROGRESS), progress)


def _load_state(out, progress):
  return {name: zarr_io.read(os.path.join(out, 'state', str(progress['slot']), name))
          for name in encoding.init_state(1, 1, 1)}


def _run_pass(run, out, mesh, arrays, options, progress, n_rows, batch_size):
  """Stage 1: all batches; returns the final state on the host."""
  encoder = encoding.make_encoder(run.sae)
  block = encoding.check_block_size(encoder, mesh, options.block_size or run.sae.block_size)
  n_batches = -(-n_rows // batch_size)
  done = progress['batches_done']
  if 'slot' in progress:
    state = _load_state(out, progress)
    logs.stage('statistics pass in %s resumes after batch %d of %d', out, done, n_batches)
  else:
    state = encoding.init_state(encoder.n_latents, options.top_n, options.n_samples)
  state = encoding.place(mesh, state, encoding.state_specs())
  codes_shape = (n_rows, max(encoder.top_k, 1))
  if encoder.top_k and done == 0:
    for name, dtype in (('values', np.float32), ('latents', np.int32)):
      zarr_io.create(os.path.join(out, 'codes', name), codes_shape, dtype, batch_size)
  codes = ({name: zarr_io.open_array(os.path.join(out, 'codes', name))
            for name in ('values', 'latents')} if encoder.top_k else None)
  update = encoding.make_update(encoder, mesh, block)
  scale = run.data_scale

  def read(i):
    start = i * batch_size
    return start, run.reader.read_rows_async(start, min(start + batch_size, n_rows))

  bar = tqdm.tqdm(total=n_rows, initial=min(done * batch_size, n_rows), unit='tok',
                  unit_scale=True, desc='features', file=sys.stderr,
                  disable=not options.progress, dynamic_ncols=True)
  last_save, since_save = time.monotonic(), 0
  timed_from, timed_rows = None, 0  # throughput after this process's first (compiling) batch
  pending = read(done) if done < n_batches else None
  try:
    for i in range(done, n_batches):
      start, future = pending
      rows = np.asarray(future.result(), np.float32) * np.float32(scale)
      pending = read(i + 1) if i + 1 < n_batches else None
      valid = np.arange(batch_size) < len(rows)
      x = np.zeros((batch_size, rows.shape[1]), np.float32)
      x[:len(rows)] = rows
      state, (values, latents) = update(state, arrays, x, valid, np.int32(start))
      if codes is not None:
        n = len(rows)
        codes['values'][start:start + n].write(np.asarray(values)[:n]).result()
        codes['latents'][start:start + n].write(np.asarray(latents)[:n]).result()
      bar.update(len(rows))
      if timed_from is None:
        jax.block_until_ready(state)
        timed_from = time.perf_counter()
      else:
        timed_rows += len(rows)
      since_save += 1
      progress['batches_done'] = i + 1
      if i + 1 < n_batches and ((options.save_every and since_save >= options.save_every)
                                or time.monotonic() - last_save >= options.save_seconds):
        _save_state(out, state, progress)
        last_save, since_save = time.monotonic(), 0
  finally:
    bar.close()
  jax.block_until_ready(state)
  if timed_from is not None:
    progress['timing'] = {'pass_rows': timed_rows,
                          'pass_seconds': time.perf_counter() - timed_from}
  return jax.device_get(state)


def _finish_statistics(out, state, options, n_rows):
  """Writes statistics/ from the pass's final state; returns the host arrays."""
  count = state['count'].astype(np.int64)
  stats = {
      'count': count, 'act_sum': state['act_sum'], 'hist': state['hist'],
      'hist_edges': encoding.hist_edges(),
      'top_values': np.maximum(state['top_values'], 0.0), 'top_rows': state['top_rows'],
      'sample_values': state['sample_values'], 'sample_rows': state['sample_rows'],
      'sample_bucket': _quantile_buckets(state['sample_values'], state['sample_rows'],
                                         options.quantiles),
      'frequency': count / max(n_rows, 1),
      'mean_activation': state['act_sum'] / np.maximum(count, 1),
      'max_activation': np.maximum(state['top_values'][:, 0], 0.0),
  }
  for name, value in stats.items():
    zarr_io.write(os.path.join(out, 'statistics', name), value)
  return stats


def _quantile_buckets(values, rows, quantiles):
  """Bucket 1..quantiles of each sample by its rank among the latent's samples (-1: none)."""
  valid = rows >= 0
  order = np.argsort(np.where(valid, values, np.inf), axis=1, kind='stable')
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.arange(values.shape[1])[None, :], axis=1)
  m = np.maximum(valid.sum(axis=1, keepdims=True), 1)
  return np.where(valid, ranks * quantiles // m + 1, -1).astype(np.int8)


# ---------------------------------------------------------------------------
# The whole computation
# ---------------------------------------------------------------------------


def compute_statistics(workdir, *, store=None, step=None, out=None, options=Options(),
                       lm_model=None, mesh=None, restart=False):
  """Runs (or resumes) the statistics of a trained SAE; returns the output directory.

  Args:
    workdir: the training run directory.
    store: another store of the same site and model, or None for the run's.
    step: checkpoint step (None: the latest).
    out: output directory (None: <workdir>/features).
    options: `Options`.
    lm_model: an already loaded (cfg, params, tokenizer) of the store's model; by
      default loaded from the harvest record (a synthetic store has none: no logits).
    mesh: a ('data', 'model') mesh (default: every device on 'model').
    restart: discard an unfinished pass in `out` instead of resuming it.

  Raises:
    FileNotFoundError, ValueError: see `open_run`; ValueError when `out` holds an
      unfinished pass with other settings (and not `restart`).
  """
  run = open_run(workdir, store=store, step=step)
  out = features_dir(run.workdir) if out is None else os.path.abspath(out)
  n_rows = run.reader.n_rows if options.tokens <= 0 else min(options.tokens, run.reader.n_rows)
  batch_size = options.batch_size or run.config.train.batch_size
  if n_rows <= 0 or batch_size <= 0:
    raise ValueError(f'need tokens > 0 and batch_size > 0; got {n_rows} rows of {run.reader.path}'
                     f' and batch_size {batch_size}')
  identity = _identity(run, options, n_rows, batch_size)
  os.makedirs(out, exist_ok=True)
  if restart and os.path.exists(os.path.join(out, PROGRESS)):
    os.remove(os.path.join(out, PROGRESS))
  progress = _load_progress(out, identity)
  if progress is None:
    finished = zarr_io.read_json(os.path.join(out, RESULT))
    if finished is not None and finished.get('identity') == identity and not restart:
      logs.stage('feature statistics in %s are complete for these settings', out)
      return out
    if finished is not None:
      os.remove(os.path.join(out, RESULT))  # a new pass replaces finished results
    progress = {'identity': identity, 'stage': 'pass', 'batches_done': 0,
                'contexts_done': 0, 'logits_done': 0}
    zarr_io.write_json(os.path.join(out, PROGRESS), progress)
  save = lambda: zarr_io.write_json(os.path.join(out, PROGRESS), progress)
  mesh = encoding.latent_mesh() if mesh is None else mesh
  params, buffers = restore_params(run, mesh)
  encoder = encoding.make_encoder(run.sae)
  arrays = encoding.place(mesh, encoding.encoder_arrays(encoder, params, buffers),
                          encoding.array_specs())
  if progress['stage'] == 'pass':
    logs.stage('statistics pass: %d %s latents over %d tokens of %s -> %s', run.sae.n_latents,
               run.sae.name, n_rows, run.reader.path, out)
    state = _run_pass(run, out, mesh, arrays, options, progress, n_rows, batch_size)
    _finish_statistics(out, state, options, n_rows)
    progress['stage'] = 'contexts'
    zarr_io.write_json(os.path.join(out, PROGRESS), progress)
  stats = {name: zarr_io.read(os.path.join(out, 'statistics', name))
           for name in ('count', 'top_values', 'top_rows', 'sample_values', 'sample_rows',
                        'sample_bucket')}
  if progress['stage'] == 'contexts':
    logs.stage('contexts of %d features from the store', run.sae.n_latents)
    started = time.perf_counter()
    contexts_lib.run_contexts(run, out, arrays, stats, options, progress, save, n_rows)
    progress.setdefault('timing', {})['contexts_seconds'] = time.perf_counter() - started
    progress['stage'] = 'logits'
    zarr_io.write_json(os.path.join(out, PROGRESS), progress)
  lm_model = lm_model or load_language_model(run.manifest)
  if lm_model is not None:
    logs.stage('logit effects through %s', language_model_path(run.manifest))
    started = time.perf_counter()
    logits_lib.run_logits(run, out, params, lm_model, options, progress, save)
    progress.setdefault('timing', {})['logits_seconds'] = time.perf_counter() - started
  else:
    log.info('the store %s records no language model (synthetic data): no logit effects',
             run.reader.path)
  manifest = run.manifest
  result = {
      'format': FORMAT, 'version': VERSION, 'workdir': run.workdir,
      'checkpoint_step': run.step, 'architecture': run.sae.name,
      'n_latents': run.sae.n_latents, 'd_model': run.sae.d_model,
      'site': manifest['site'], 'model': manifest['model'], 'store': run.reader.path,
      'language_model': language_model_path(manifest), 'data_scale': run.data_scale,
      'n_tokens': n_rows, 'batch_size': batch_size, 'options': dataclasses.asdict(options),
      'hist_edges': [float(e) for e in encoding.hist_edges()],
      'has_logits': lm_model is not None, 'bos_id': (manifest.get('extra') or {}).get('bos_id'),
      # Seconds of this process's stages (the pass's after its first, compiling, batch).
      'timing': progress.get('timing', {}),
      'identity': identity,  # a rerun with the same settings returns at once
  }
  zarr_io.write_json(os.path.join(out, RESULT), result)
  os.remove(os.path.join(out, PROGRESS))
  logs.stage('feature statistics of %d latents over %d tokens in %s', run.sae.n_latents, n_rows,
           out)
  return out


def _parser():
  parser = cli.ArgumentParser(prog='python -m dictlearn.analysis.features', description=__doc__)
  parser.add_argument('--workdir', required=True,
                      help="training run directory (or a pipeline's directory: its run is sae/)")
  parser.add_argument('--store', default=None, help="activation store (default: the run's)")
  parser.add_argument('--tokens', type=int, default=0, help='store rows to read (0: all)')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
  parser.add_argument('--out', default=None, help='output directory (default RUN/features)')
  for field in dataclasses.fields(Options):
    if field.name not in ('tokens', 'progress'):  # Options' docstring says what each does
      parser.add_argument(f'--{field.name}', type=field.type, default=field.default)
  parser.add_argument('--restart', action='store_true', help='discard an unfinished pass')
  parser.add_argument('--no_progress', action='store_true', help='no progress bars')
  return parser


def _main(args):
  options = Options(progress=not args.no_progress, **{
      f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if f.name != 'progress'})
  out = compute_statistics(args.workdir, store=args.store, step=args.step, out=args.out,
                           options=options, restart=args.restart)
  print(load_statistics(out).summary())
  return 0


def main(argv=None):
  """python -m dictlearn.analysis.features --workdir DIR [--store PATH] [--tokens N]"""
  return cli.run_tool(_main, _parser(), argv, log_dir=lambda a: ckpt_lib.run_directory(
      a.workdir) if os.path.isdir(a.workdir) else None)


if __name__ == '__main__':
  sys.exit(main())
