"""Harvest: run a language model over a corpus, write hook-site activations to stores.

    python -m dictlearn.harvest --config experiments/harvest_smollm2.py --out DIR [--config.x=y]

Output, under OUT (a local path or a kvstore URL, see `dictlearn.data.store`):

    OUT/<site>/       one activation store per site: activations, and per row the
                      token id, document index and position in the document.
    OUT/harvest.json  the harvest record: config, model, corpus, resume checkpoints,
                      and the summary once complete.

One forward pass reads every site (`read_sites`), running only the blocks up to
the deepest one. Contexts are packed as in `dictlearn.data.corpus` (every context
starts with BOS; documents are separated by BOS); BOS positions are left out of
the stores unless `exclude_bos` is False, since their activations are outliers
(norms ~100x the others) that would dominate an SAE's loss.

Resume: the contexts are a deterministic sequence, so the rows of every site are
too, and row r of one site store is the same token as row r of another. Before a
batch of contexts is forwarded, its packing state and the rows written before it
go to harvest.json as a checkpoint. Each store commits on its own (whole shards,
see `StoreWriter`), so after a kill the sites may hold different numbers of
committed rows, none of them at a batch boundary. A rerun of the same command
reopens the writers, restarts packing at the latest checkpoint at or before the
fewest committed rows, and hands each store only the rows past its own committed
count: the finished stores hold every token once, in the uninterrupted order.
Errors (a bad corpus file met mid-way, Ctrl-C) flush what was appended first.

Several processes (a multi-host run, `dictlearn.distributed`): the same stores,
filled by all; each process runs the model over the contexts of its own store
shards and process 0 writes the manifests and the summary last
(`dictlearn.harvest.parallel`). A harvest resumes with the process count it
started with.
"""
import json
import logging
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import tensorstore as ts
import tqdm

from dictlearn import distributed
from dictlearn import logs
from dictlearn.data import corpus as corpus_lib
from dictlearn.data import store as store_lib
from dictlearn.lm import generate as generate_lib
from dictlearn.lm import llama
from dictlearn.lm import models as models_lib
from dictlearn.harvest import parallel

log = logging.getLogger(__name__)

RECORD = 'harvest.json'
RECORD_FORMAT = 'dictlearn.harvest'
RECORD_VERSION = 1
PACKING = ('each context starts with BOS; documents are concatenated with a BOS between '
           'them (a document starting a context uses the context BOS)')
_MODEL_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Config fields that may change between a harvest and its resume (the process count
# may not: it is checked on its own, see `check_processes`).
_RESUMABLE_CHANGES = ('batch_size', 'progress', 'distributed')


# ---- validation -----------------------------------------------------------------------


def resolve_model_path(model):
  """The model config.model names: '' = SmolLM2's GGUF, a .gguf file, or a Hugging Face directory.

  Raises:
    FileNotFoundError: nothing there (for a Hugging Face model id, the message
      says how to download it); see `dictlearn.lm.models.resolve_model`.
  """
  try:
    return models_lib.resolve_model(model)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.model: {e}') from None


def harvested_model_path(manifest):
  """The model a store was harvested from, as a path to load; None if it was not harvested.

  The absolute path the harvest recorded (`extra.model.path`) while it exists,
  else the harvest's config.model resolved from the current directory.

  Raises:
    FileNotFoundError: neither names a model that is there.
  """
  extra = (manifest or {}).get('extra') or {}
  if 'harvest' not in extra:
    return None
  path = (extra.get('model') or {}).get('path')
  if path and os.path.exists(path):
    return path
  return resolve_model_path(extra['harvest']['model'])


def _expect(ok, field, value, expected):
  if not ok:
    raise ValueError(f'config.{field}={value!r}: expected {expected}')


def validate_config(config):
  """Checks every harvest config field that needs no model, before anything is read
  or written (`check_config` adds the checks against the model).

  Raises:
    ValueError: the field, its value and what was expected.
    corpus_lib.CorpusError: a corpus spec naming no such file.
  """
  sites = tuple(config.sites)
  _expect(sites and all(isinstance(s, str) and s for s in sites), 'sites', sites,
          'a non-empty tuple of hook site names')
  _expect(len(set(sites)) == len(sites), 'sites', sites, 'each site once (it lists a site twice)')
  integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
  _expect(integer(config.context_length) and config.context_length >= 2, 'context_length',
          config.context_length, 'an integer >= 2')
  _expect(integer(config.batch_size) and config.batch_size >= 1, 'batch_size',
          config.batch_size, 'an integer >= 1')
  _expect(integer(config.token_budget) and (config.token_budget == -1 or config.token_budget >= 1),
          'token_budget', config.token_budget, 'an integer >= 1, or -1 (the whole corpus)')
  _expect(config.dtype in _MODEL_DTYPES, 'dtype', config.dtype, f'one of {sorted(_MODEL_DTYPES)}')
  _expect(config.store_dtype in store_lib.DTYPES, 'store_dtype', config.store_dtype,
          f'one of {sorted(store_lib.DTYPES)}')
  _expect(integer(config.store_chunk_rows) and config.store_chunk_rows >= 0, 'store_chunk_rows',
          config.store_chunk_rows, 'an integer >= 0 (0: about 2 MiB of rows)')
  _expect(integer(config.store_shard_chunks) and config.store_shard_chunks >= 1,
          'store_shard_chunks', config.store_shard_chunks, 'an integer >= 1')
  _expect(isinstance(config.jsonl_field, str) and config.jsonl_field, 'jsonl_field',
          config.jsonl_field, 'a non-empty field name')
  parts = corpus_lib.parse_spec(config.corpus)  # names the part that is no file
  if corpus_lib.GENERATED in parts:
    g, n = config.generate, len(corpus_lib.GENERATION_PROMPTS)
    _expect(g.n_prompts == -1 or 1 <= g.n_prompts <= n, 'generate.n_prompts', g.n_prompts,
            f'-1 (all {n}) or 1..{n}')
    _expect(g.max_new_tokens >= 1, 'generate.max_new_tokens', g.max_new_tokens, '>= 1')
    _expect(g.temperature >= 0, 'generate.temperature', g.temperature, '>= 0 (0: greedy)')
    _expect(0 < g.top_p <= 1, 'generate.top_p', g.top_p, 'a probability in (0, 1]')
    _expect(g.batch_size >= 1, 'generate.batch_size', g.batch_size, '>= 1')


def check_config(config, lm_cfg):
  """Validates the harvest config, and against the model's config.

  Raises:
    ValueError: the field, what was expected and what was found.
  """
  validate_config(config)
  for site in tuple(config.sites):
    llama.parse_site(site, lm_cfg.n_layers)  # the message lists the valid sites
  if config.context_length > lm_cfg.context_length:
    raise ValueError(f'config.context_length must be in [2, {lm_cfg.context_length}] (the '
                     f'context length of {lm_cfg.name or "the model"}), '
                     f'got {config.context_length}')


def _config_identity(config):
  """The config as JSON, minus the fields a resume may change."""
  identity = json.loads(json.dumps(config.to_dict()))
  for key in _RESUMABLE_CHANGES:
    identity.pop(key, None)
  if corpus_lib.GENERATED not in corpus_lib.parse_spec(config.corpus):
    identity.pop('generate', None)
  return identity


def _differences(old, new, prefix=''):
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f'{prefix}{key}.')
    elif a != b:
      out.append(f'{prefix}{key}: was {a!r}, now {b!r}')
  return out


def _check_same(out_dir, what, old, new):
  diffs = _differences(old, new)
  if diffs:
    raise ValueError(f'{out_dir}/{RECORD}: this output holds a harvest started with a different '
                     f'{what}: {"; ".join(diffs[:8])}. Resume with the original settings or '
                     'harvest into a new --out directory.')


# ---- harvest record -------------------------------------------------------------------


class _Record:
  """OUT/harvest.json, read and written through the store's kvstore layer."""

  def __init__(self, out_dir):
    self._kv = ts.KvStore.open(store_lib.kvstore_spec(out_dir), context=store_lib.CONTEXT).result()
    result = self._kv.read(RECORD).result()
    self.data = json.loads(result.value) if result.state == 'value' else None

  def save(self):
    if distributed.is_primary():  # one writer; the others hold the same data
      self._kv.write(RECORD, json.dumps(self.data, indent=1, sort_keys=True).encode()).result()

  def add_checkpoint(self, rows, state, committed):
    """Records a batch start; drops checkpoints no resume can need (see module doc)."""
    points = self.data['checkpoints']
    if points and points[-1]['rows'] >= rows:
      return
    points.append({'rows': rows, 'state': state.to_json()})
    keep = max(i for i, p in enumerate(points) if p['rows'] <= committed)
    self.data['checkpoints'] = points[keep:]
    self.save()

  def resume_point(self, committed):
    """(rows, PackState) of the latest checkpoint at or before `committed` rows."""
    point = max((p for p in self.data['checkpoints'] if p['rows'] <= committed),
                key=lambda p: p['rows'])
    return point['rows'], corpus_lib.PackState.from_json(point['state'])


# ---- stores ---------------------------------------------------------------------------


class _SiteOutput:
  """The writer of one site's store, or the row count of an already finished one."""

  def __init__(self, path, d_model, config, metadata):
    self.path = path
    manifest, _ = store_lib.read_status(path)
    self.writer, self.finished_rows = None, None
    if manifest is not None:
      self.finished_rows = manifest['n_tokens']
      return
    self.writer = store_lib.StoreWriter(
        path, d_model, config.store_dtype, chunk_rows=config.store_chunk_rows or None,
        shard_chunks=config.store_shard_chunks, metadata=metadata)

  @property
  def n_rows(self):
    return self.finished_rows if self.writer is None else self.writer.n_rows

  @property
  def n_committed(self):
    return self.finished_rows if self.writer is None else self.writer.n_committed

  def append(self, first_row, rows, tokens, doc, pos, target):
    """Appends the part of rows [first_row, first_row + len(rows)) this store lacks."""
    lo, hi = max(first_row, self.n_rows), first_row + len(rows)
    if target >= 0:
      hi = min(hi, target)
    if self.n_rows < first_row:
      raise RuntimeError(f'store at {self.path} holds {self.n_rows} rows but the harvest '
                         f'resumed at row {first_row}: rows would be missing')
    if hi > lo and self.writer is not None:
      s = slice(lo - first_row, hi - first_row)
      self.writer.append(rows[s], tokens=tokens[s], doc=doc[s], pos=pos[s])

  def flush(self):
    if self.writer is not None:
      self.writer.flush()


# ---- the harvest ----------------------------------------------------------------------


def _load_model(config, model_path, model):
  if model is not None:
    return model
  return models_lib.load_model(model_path, dtype=_MODEL_DTYPES[config.dtype])


def _generated_path(config, model_path):
  if corpus_lib.GENERATED not in corpus_lib.parse_spec(config.corpus):
    return None
  prompts, settings = _generation_settings(config)
  return corpus_lib.generated_cache_path(config.generate.cache_dir, model_path, prompts, settings)


def _generation_settings(config):
  g = config.generate
  n = len(corpus_lib.GENERATION_PROMPTS) if g.n_prompts < 0 else g.n_prompts
  settings = {'max_new_tokens': g.max_new_tokens, 'temperature': g.temperature,
              'top_p': g.top_p, 'batch_size': g.batch_size, 'seed': config.seed}
  return corpus_lib.GENERATION_PROMPTS[:n], settings


def _generate_corpus(config, corpus, lm):
  lm_cfg, params, tokenizer = lm
  prompts, s = _generation_settings(config)
  logs.stage('generating the corpus\'s model-written part (%d prompts, up to %d tokens each) '
           'into %s', len(prompts), s['max_new_tokens'], corpus.generated_path)

  def generate_fn(batch, seed):
    return generate_lib.chat(params, lm_cfg, tokenizer, list(batch),
                             max_new_tokens=s['max_new_tokens'], temperature=s['temperature'],
                             top_p=s['top_p'] if s['temperature'] > 0 else 1.0, seed=seed)

  corpus_lib.ensure_generated(corpus.generated_path, prompts, generate_fn,
                              batch_size=s['batch_size'], seed=s['seed'])


def _batches(contexts, batch_size):
  batch = []
  for context in contexts:
    batch.append(context)
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def harvest(config, out_dir, *, model=None):
  """Harvests activations of `config.sites` into OUT/<site>/ stores; resumes if started.

  Args:
    config: a harvest config (experiments/harvest_smollm2.py).
    out_dir: output directory or kvstore URL.
    model: optional preloaded (LlamaConfig, params, Tokenizer) of `config.model`,
      in `config.dtype` (tests and benchmarks load it once).

  Returns:
    Summary dict: stores, n_tokens (rows per site), n_contexts, documents,
    corpus_exhausted; seconds and tokens_per_s of this run's loop (packing,
    forward, writes; the first batch's compilation included).

  Raises:
    FileNotFoundError: the model is missing (a GGUF file or a Hugging Face directory).
    ValueError: a bad config field (unknown site, context length beyond the
      model's, ...), or OUT holds a harvest with a different config.
    corpus_lib.CorpusError: an empty corpus or an unreadable document.
  """
  out_dir = os.fspath(out_dir).rstrip('/')
  # ---- validate everything that can be, before writing anything ----
  validate_config(config)
  model_path = resolve_model_path(config.model)
  lm_cfg = model[0] if model is not None else models_lib.load_config(model_path)
  check_config(config, lm_cfg)
  sites = tuple(config.sites)
  corpus = corpus_lib.Corpus(config.corpus, jsonl_field=config.jsonl_field,
                             generated_path=_generated_path(config, model_path))
  if not corpus.needs_generation:
    corpus.check_not_empty()
  model_info = models_lib.model_identity(model_path)
  record = _Record(out_dir)
  n_processes = distributed.process_count()
  if record.data is not None:
    _check_same(out_dir, 'config', record.data['config'], _config_identity(config))
    _check_same(out_dir, 'model', record.data['model'], model_info)
    if record.data['complete']:
      logs.stage('harvest in %s is already complete', out_dir)
      return _located(record.data['summary'], out_dir)
    check_processes(out_dir, record.data.get('processes', 1), n_processes)
  if n_processes > 1 and corpus.needs_generation:
    raise ValueError(f'corpus {config.corpus!r} has a model-written part that is not generated '
                     f'yet; a harvest over {n_processes} processes needs the text ready: run '
                     'the harvest once in one process to generate it (it is cached), or harvest '
                     'a corpus without "generated"')

  lm = _load_model(config, model_path, model)
  lm_cfg, params, tokenizer = lm
  if corpus.needs_generation:
    _generate_corpus(config, corpus, lm)
    corpus.check_not_empty()
  corpus_info = corpus.describe()
  if tokenizer.bos_id is None:
    raise ValueError(f'{model_path}: the tokenizer names no BOS token; packing needs one')
  if record.data is None:
    record.data = {'format': RECORD_FORMAT, 'version': RECORD_VERSION,
                   'config': _config_identity(config), 'model': model_info,
                   'corpus': corpus_info, 'bos_id': tokenizer.bos_id, 'complete': False,
                   'processes': n_processes,
                   'checkpoints': [{'rows': 0, 'state': corpus_lib.PackState().to_json()}]}
    record.save()
  changed = _differences(record.data['corpus'], corpus_info)
  if changed:
    # A corpus file fixed after an error, or one that grew: the rows written so far
    # keep the text they were read from; the rest is read from the corpus as it is now.
    log.warning('corpus %r changed since the harvest in %s started (%s); continuing',
                config.corpus, out_dir, '; '.join(changed[:4]))
    record.data['corpus'] = corpus_info
    record.save()

  metadata = {
      'model': model_info['file'], 'tokenizer': {
          'bos_id': tokenizer.bos_id, 'eos_id': tokenizer.eos_id,
          'vocab_size': tokenizer.vocab_size},
      'corpus': corpus_info,
      'extra': {'harvest': json.loads(json.dumps(config.to_dict())),
                'model': dict(model_info, name=lm_cfg.name,
                              sha256=models_lib.model_sha256(model_path),
                              format='hf' if os.path.isdir(model_path) else 'gguf',
                              path=os.path.abspath(model_path), n_layers=lm_cfg.n_layers),
                'context_length': config.context_length, 'packing': PACKING,
                'bos_id': tokenizer.bos_id, 'exclude_bos': config.exclude_bos}}
  if n_processes > 1:
    return _run_parallel(config, out_dir, corpus, lm, record, metadata, n_processes)
  outputs = {site: _SiteOutput(f'{out_dir}/{site}', lm_cfg.d_model, config,
                               dict(metadata, site=site)) for site in sites}
  return _run(config, out_dir, corpus, lm, record, outputs)


def check_processes(out_dir, recorded, n_processes):
  """A harvest resumes with the process count it started with (its blocks are assigned
  by it).

  Raises:
    ValueError: naming both counts.
  """
  if recorded != n_processes:
    raise ValueError(f'{out_dir}/{RECORD}: this harvest was started by {recorded} '
                     f'process(es) and is resumed by {n_processes}: resume it with '
                     f'{recorded}, or harvest into a new --out directory')


def _run_parallel(config, out_dir, corpus, lm, record, metadata, n_processes):
  """Every process forwards its blocks (`dictlearn.harvest.parallel`); process 0 then
  seals the stores and writes the summary, last."""
  distributed.barrier('dictlearn harvest record written')
  sites = tuple(config.sites)
  writers = parallel.open_writers(config, out_dir, sites, lm[0].d_model, metadata, n_processes)
  n_tokens, last, exhausted, seconds, written = parallel.run(config, out_dir, corpus, lm,
                                                             writers)
  distributed.barrier('dictlearn harvest blocks written')
  if n_tokens == 0:
    raise corpus_lib.CorpusError(f'corpus {config.corpus!r} gave no token to harvest')
  if distributed.is_primary():
    for site in sites:
      store_lib.finish_block_store(f'{out_dir}/{site}', n_tokens)
  summary = _summary(config, sites, n_tokens, last, exhausted, seconds, written)
  record.data.update(complete=True, summary=summary, checkpoints=[])
  record.save()
  distributed.barrier('dictlearn harvest finished')
  logs.stage('harvest in %s complete: %d tokens per site over %d processes, %.0f tokens/s in '
             'process %d', out_dir, n_tokens, n_processes, summary['tokens_per_s'],
             distributed.process_index())
  return _located(summary, out_dir)


def _run(config, out_dir, corpus, lm, record, outputs):
  """The harvest loop: pack, forward, append; then finish the stores."""
  lm_cfg, params, tokenizer = lm
  sites, target, batch_size = tuple(outputs), config.token_budget, config.batch_size
  committed = min(o.n_committed for o in outputs.values())
  rows, state = record.resume_point(committed)
  if committed:
    logs.stage('resuming harvest in %s at row %d (packing from context %d, document %d)',
             out_dir, committed, state.context, state.doc)
  contexts = corpus_lib.pack_contexts(corpus, tokenizer.encode_batch, tokenizer.bos_id,
                                      config.context_length, start=state)
  pad = np.full((config.context_length,), tokenizer.bos_id, np.int32)

  def forward(tokens):
    _, acts = llama.forward(params, lm_cfg, tokens, read_sites=sites, return_logits=False,
                            stop_at_deepest=True)
    return acts

  def write(pending):
    first_row, batch, acts = pending
    masks = np.stack([c.row_mask(config.exclude_bos) for c in batch]).reshape(-1)
    cols = [np.concatenate([getattr(c, k) for c in batch])[masks] for k in ('tokens', 'doc', 'pos')]
    for site in sites:
      x = np.asarray(acts[site])[:len(batch)].reshape(-1, lm_cfg.d_model)[masks]
      outputs[site].append(first_row, x, *cols, target)

  progress = tqdm.tqdm(total=None if target < 0 else target, initial=committed, unit='tok',
                       unit_scale=True, desc='harvest', file=sys.stderr,
                       disable=not config.progress, dynamic_ncols=True)
  start_time, start_rows = time.perf_counter(), committed
  last = {'contexts': 0, 'documents': 0}
  exhausted, pending, corpus_error = True, None, None
  batches = _batches(contexts, batch_size)
  try:
    while True:
      try:
        batch = next(batches)
      except StopIteration:
        break
      except corpus_lib.CorpusError as e:
        corpus_error = e  # write what came before it, then stop
        break
      if 0 <= target <= rows:
        exhausted = False
        break
      record.add_checkpoint(rows, batch[0].start, min(o.n_committed for o in outputs.values()))
      tokens = np.stack([c.tokens for c in batch] + [pad] * (batch_size - len(batch)))
      acts = forward(tokens)  # dispatched asynchronously: runs while the last batch is written
      if pending is not None:
        write(pending)
        progress.update(min(o.n_rows for o in outputs.values()) - progress.n)
      pending = (rows, batch, acts)
      for c in batch:
        docs = c.doc[c.row_mask(config.exclude_bos)]
        if len(docs) and (target < 0 or rows < target):
          used = len(docs) if target < 0 else min(len(docs), target - rows)
          last = {'contexts': c.start.context + 1, 'documents': int(docs[used - 1]) + 1}
        rows += len(docs)
    if pending is not None:
      write(pending)
      progress.update(min(o.n_rows for o in outputs.values()) - progress.n)
  finally:
    # Whatever stopped the loop (the end, a bad corpus file, Ctrl-C), what was
    # appended is valid data: commit it, and a rerun continues after it.
    for o in outputs.values():
      o.flush()
    progress.close()
  if corpus_error is not None:
    raise corpus_error
  if 0 <= target <= rows:
    exhausted = False
  return _finish(config, out_dir, record, outputs, last, exhausted,
                 time.perf_counter() - start_time, start_rows)


def _finish(config, out_dir, record, outputs, last, exhausted, seconds, start_rows):
  counts = {site: o.n_rows for site, o in outputs.items()}
  if len(set(counts.values())) != 1:
    raise RuntimeError(f'harvest in {out_dir}: sites hold different row counts {counts}')
  n_tokens = next(iter(counts.values()))
  if n_tokens == 0:
    raise corpus_lib.CorpusError(f'corpus {config.corpus!r} gave no token to harvest')
  for o in outputs.values():
    if o.writer is not None:
      o.writer.finish()
  if exhausted and config.token_budget > 0:
    log.warning('corpus %r ran out after %d tokens, before token_budget %d', config.corpus,
                n_tokens, config.token_budget)
  summary = _summary(config, tuple(outputs), n_tokens, last, exhausted, seconds,
                     n_tokens - start_rows)
  record.data.update(complete=True, summary=summary, checkpoints=[])
  record.save()
  logs.stage('harvest in %s complete: %d tokens per site, %d contexts, %.0f tokens/s', out_dir,
             n_tokens, summary['n_contexts'], summary['tokens_per_s'])
  return _located(summary, out_dir)


def _summary(config, sites, n_tokens, last, exhausted, seconds, written):
  # The record names each store by its site (its folder under OUT), so that the
  # output directory can move; the caller gets paths (`_located`).
  return {'stores': {s: s for s in sites}, 'n_tokens': n_tokens,
          'n_contexts': last['contexts'], 'documents': last['documents'],
          'corpus_exhausted': exhausted, 'context_length': config.context_length,
          'exclude_bos': config.exclude_bos, 'seconds': seconds,
          'tokens_per_s': written / max(seconds, 1e-9)}


def _located(summary: dict, out_dir: str) -> dict:
  """A recorded summary with the output directory and its stores as paths (absolute, or
  the kvstore URL) for this process."""
  out_dir = out_dir if '://' in out_dir else os.path.abspath(out_dir)
  stores = {site: f'{out_dir}/{site}' for site in summary['stores']}
  return {**summary, 'out_dir': out_dir, 'stores': stores}
