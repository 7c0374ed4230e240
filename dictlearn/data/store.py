"""Activation store: a TensorStore zarr3 directory of activations and their tokens.

Layout (one directory per site; every key goes through a TensorStore kvstore, so a
local path, `file://`, `memory://`, `gs://` and `s3://` behave alike):

    activations/    zarr3 [n_tokens, d_model], float32 or bfloat16. Read chunks of
                    `chunk_rows` whole rows (about 2 MiB), `shard_chunks` of them
                    packed into one file by the `sharding_indexed` codec.
    tokens/ doc/ pos/   zarr3 int32 [n_tokens] (token id, document index, position
                    in the document; -1 where unknown), same row sharding, zstd.
    progress.json   while writing: committed rows, running statistics, metadata.
    manifest.json   written last; a store without it is incomplete.

Growing arrays: the arrays are created with 0 rows and grown with TensorStore's
`resize(expand_only=True)` before each flush, and `finish()` trims them to exactly
`n_tokens`. The alternative (a huge fixed shape plus a row count on the side) would
leave every other zarr reader seeing a wrong shape; a resize is one small metadata
write per flush.

Integrity (writer version 2): every chunk is stored, even one equal to the fill
value, and each chunk carries a crc32c, so a missing chunk file or a flipped byte
is an error when read (`StoreReadError`, naming the store and the rows) instead
of rows of zeros or wrong values. Readers refuse a missing activation chunk in
older stores too (a real chunk of activations is never all zeros); reads of
activations also refuse rows that are not finite (`NonFiniteRowsError`, naming
them), which a store written elsewhere may hold. `verify_store` reads every
chunk and checks it against the manifest (`tools/inspect_store.py --verify`).

Commits: `append` buffers rows and writes whenever whole shards are complete, so a
shard file is written once instead of rewritten by every small batch; `flush()`
also writes a trailing partial shard. After each write the committed row count and
the float64 statistics go to `progress.json` (a single kvstore write: an atomic
rename on local disk, an atomic object on cloud stores). A killed writer is reopened
with the same arguments and resumes at the committed row, overwriting anything
beyond it. One writer per store at a time, or several processes each writing
its own blocks of whole shard files (`BlockWriter`, for a multi-host harvest).
"""
import json
import logging
import os
import urllib.parse

import ml_dtypes
import numpy as np
import tensorstore as ts

# 1: the first format. 2: every chunk stored (fill-valued ones too) and a crc32c
# per chunk; readers of version-1 stores accept missing int chunks (see `_open_array`).
WRITER_VERSION = 2
FORMAT = 'dictlearn.activation_store'
MANIFEST = 'manifest.json'
PROGRESS = 'progress.json'
ACTIVATIONS = 'activations'
INT_ARRAYS = ('tokens', 'doc', 'pos')
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}
METADATA_KEYS = ('model', 'site', 'tokenizer', 'corpus', 'extra')
_REQUIRED_METADATA = ('model', 'site')
_TARGET_CHUNK_BYTES = 2 << 20

# One context for the process: `memory://` stores live in a context's memory
# kvstore, so the writer and every reader must share it; the shared cache pool is
# left at TensorStore's default (no caching), the loader manages its own buffers.
CONTEXT = ts.Context()


class IncompleteStoreError(RuntimeError):
  """The store has no manifest.json: its writer has not finished."""
  user_error = True  # its message is the whole story (dictlearn.cli)


class StoreReadError(OSError):
  """Rows of a store cannot be read: a chunk is missing, truncated or fails its checksum."""


class NonFiniteRowsError(ValueError):
  """Rows of a store hold NaN or Inf."""


# ---- paths ------------------------------------------------------------------


def kvstore_spec(path):
  """Maps a store path or URL to a TensorStore kvstore spec (a directory).

  Args:
    path: a local path, or a `file://`, `memory://`, `gs://` or `s3://` URL.

  Returns:
    A kvstore spec dict whose `path` ends with '/'.

  Raises:
    ValueError: for an unsupported URL scheme or a cloud URL without a bucket.
  """
  path = os.fspath(path)
  parsed = urllib.parse.urlparse(path)
  scheme = parsed.scheme if '://' in path else ''
  if scheme in ('', 'file'):
    local = path[len('file://'):] if scheme else path
    return {'driver': 'file', 'path': os.path.abspath(local).rstrip('/') + '/'}
  if scheme == 'memory':
    rest = path[len('memory://'):].strip('/')
    return {'driver': 'memory', 'path': rest + '/' if rest else ''}
  if scheme in ('gs', 's3'):
    if not parsed.netloc:
      raise ValueError(f'store path {path!r} has no bucket; expected {scheme}://BUCKET/PATH')
    rest = parsed.path.strip('/')
    return {'driver': 'gcs' if scheme == 'gs' else 's3', 'bucket': parsed.netloc,
            'path': rest + '/' if rest else ''}
  raise ValueError(f'store path {path!r} has unsupported scheme {scheme!r}; expected a local '
                   'path or one of file://, memory://, gs://, s3://')


def local_directory(path):
  """Returns the local directory of a `file` store, or None for other kvstores."""
  spec = kvstore_spec(path)
  return spec['path'] if spec['driver'] == 'file' else None


def _sub_spec(base, name):
  return dict(base, path=base['path'] + name + '/')


def _open_kv(path):
  return ts.KvStore.open(kvstore_spec(path), context=CONTEXT).result()


def _read_json(kv, key):
  result = kv.read(key).result()
  if result.state != 'value':
    return None
  return json.loads(result.value)


def _write_json(kv, key, value):
  kv.write(key, json.dumps(value, indent=1, sort_keys=True).encode()).result()


def default_chunk_rows(d_model, dtype):
  """Rows per read chunk: the power of two nearest to 2 MiB of rows."""
  row_bytes = d_model * DTYPES[dtype].itemsize
  return int(2 ** max(0, round(np.log2(_TARGET_CHUNK_BYTES / row_bytes))))


def _array_spec(base, name, shape, chunk_rows, shard_chunks, dtype):
  rows_codecs = [{'name': 'bytes', 'configuration': {'endian': 'little'}}]
  if len(shape) == 1:  # ids and positions compress well; activations barely do
    rows_codecs.append({'name': 'zstd', 'configuration': {'level': 3}})
  rows_codecs.append({'name': 'crc32c'})  # a flipped byte fails the read (about 1 ms per 2 MiB)
  inner = [chunk_rows] + list(shape[1:])
  return {
      'driver': 'zarr3',
      'kvstore': _sub_spec(base, name),
      # TensorStore skips writing a chunk equal to the fill value by default; then
      # a missing chunk could not be told from a lost one.
      'store_data_equal_to_fill_value': True,
      'metadata': {
          'shape': list(shape),
          'data_type': dtype,
          'dimension_names': ['row', 'd_model'][:len(shape)],
          'chunk_grid': {'name': 'regular', 'configuration': {
              'chunk_shape': [chunk_rows * shard_chunks] + list(shape[1:])}},
          'codecs': [{'name': 'sharding_indexed', 'configuration': {
              'chunk_shape': inner,
              'codecs': rows_codecs,
              'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                               {'name': 'crc32c'}]}}],
      },
  }


def _open_array(base, name, *, writer_version=WRITER_VERSION):
  """Opens one of the store's arrays; a read of a missing chunk is an error.

  Version-1 writers left out chunks equal to the fill value (0): possible for the
  int arrays (document 0, say), never in practice for a chunk of activations.
  """
  strict = name == ACTIVATIONS or writer_version >= 2
  spec = {'driver': 'zarr3', 'kvstore': _sub_spec(base, name),
          'fill_missing_data_reads': not strict, 'store_data_equal_to_fill_value': True}
  return ts.open(spec, open=True, context=CONTEXT).result()


def read_status(path):
  """Returns (manifest, progress) of the store at `path`; each is a dict or None."""
  kv = _open_kv(path)
  return _read_json(kv, MANIFEST), _read_json(kv, PROGRESS)


def write_side_array(path, name, array):
  """Writes a small array beside the store's own (e.g. a known true dictionary).

  Args:
    path: store path or URL.
    name: array name (a subdirectory of the store); not one of the store's arrays.
    array: numpy array, written whole as one zarr3 chunk.
  """
  if name in (ACTIVATIONS,) + INT_ARRAYS:
    raise ValueError(f'store at {path}: side array name {name!r} is reserved for the store')
  array = np.ascontiguousarray(array)
  spec = {'driver': 'zarr3', 'kvstore': _sub_spec(kvstore_spec(path), name),
          'store_data_equal_to_fill_value': True,
          'metadata': {'shape': list(array.shape), 'data_type': str(array.dtype),
                       'chunk_grid': {'name': 'regular',
                                      'configuration': {'chunk_shape': list(array.shape)}}}}
  ts.open(spec, create=True, delete_existing=True, context=CONTEXT).result().write(array).result()


def read_side_array(path, name):
  """Reads an array written by `write_side_array`.

  Raises:
    FileNotFoundError: no such array in the store.
  """
  try:
    arr = _open_array(kvstore_spec(path), name)
  except ValueError as e:  # TensorStore reports a missing zarr.json as NOT_FOUND
    if 'NOT_FOUND' not in str(e):
      raise
    raise FileNotFoundError(f'store at {path} has no array {name!r}') from e
  return arr.read().result()


# ---- statistics ---------------------------------------------------------------


def _empty_stats(d_model):
  return {'count': 0, 'sum_sq_norm': 0.0, 'sum_norm': 0.0, 'sum': [0.0] * d_model}


def _add_stats(stats, rows):
  # Per-row squared norms in float32 (relative error ~1e-7 per row); every sum
  # across rows in float64, where the error would otherwise grow with the store.
  x = rows.astype(np.float32, copy=False)
  sq = np.einsum('ij,ij->i', x, x).astype(np.float64)
  return {'count': stats['count'] + len(x),
          'sum_sq_norm': stats['sum_sq_norm'] + float(sq.sum()),
          'sum_norm': stats['sum_norm'] + float(np.sqrt(sq).sum()),
          'sum': (np.asarray(stats['sum']) + x.sum(axis=0, dtype=np.float64)).tolist()}


def _summary(stats):
  n = max(stats['count'], 1)
  mean = np.asarray(stats['sum']) / n
  return {'count': stats['count'], 'mean_sq_norm': stats['sum_sq_norm'] / n,
          'mean_norm': stats['sum_norm'] / n, 'norm_of_mean': float(np.linalg.norm(mean)),
          'mean': mean.tolist()}


# ---- writer ---------------------------------------------------------------------


class StoreWriter:
  """Appends activations (and their token ids) to a store; resumable; `finish()` seals it.

  Reopening an unfinished store with the same `d_model` and `dtype` resumes at its
  last committed row (`n_rows`); the caller continues from there.
  """

  def __init__(self, path, d_model, dtype='float32', *, chunk_rows=None, shard_chunks=16,
               metadata):
    """Opens (or creates) the store for appending.

    Args:
      path: store path or URL (see `kvstore_spec`).
      d_model: activation width.
      dtype: 'float32' or 'bfloat16', the stored activation dtype.
      chunk_rows: rows per read chunk; None = about 2 MiB (or the stored value on resume).
      shard_chunks: read chunks per shard file (one file per `chunk_rows * shard_chunks`
        rows); on resume the stored value is used.
      metadata: dict with 'model' and 'site' (str) and optionally 'tokenizer',
        'corpus' (JSON values) and 'extra' (a dict, e.g. the harvest config).

    Raises:
      ValueError: bad arguments, metadata keys, or a reopened store whose d_model,
        dtype or chunk_rows differ, or which is already finished.
    """
    self.path = os.fspath(path)
    if dtype not in DTYPES:
      raise ValueError(f'store at {self.path}: dtype {dtype!r} is not one of {sorted(DTYPES)}')
    if int(d_model) <= 0:
      raise ValueError(f'store at {self.path}: d_model must be positive, got {d_model}')
    self.d_model, self.dtype = int(d_model), dtype
    self._metadata = _check_metadata(self.path, metadata)
    self._base = kvstore_spec(self.path)
    self._kv = _open_kv(self.path)
    if _read_json(self._kv, MANIFEST) is not None:
      raise ValueError(f'store at {self.path} is finished (manifest.json present); '
                       'it cannot be appended to; write a new store instead')
    progress = _read_json(self._kv, PROGRESS)
    if progress is None:
      self._create(chunk_rows, shard_chunks)
    else:
      self._resume(progress, chunk_rows, shard_chunks)
    self._buffer = []  # (activations, tokens, doc, pos) not yet written
    self._buffered = 0
    self._finished = False

  def _create(self, chunk_rows, shard_chunks):
    self.chunk_rows = int(chunk_rows or default_chunk_rows(self.d_model, self.dtype))
    self.shard_chunks = int(shard_chunks)
    if self.chunk_rows <= 0 or self.shard_chunks <= 0:
      raise ValueError(f'store at {self.path}: chunk_rows and shard_chunks must be positive, '
                       f'got {self.chunk_rows} and {self.shard_chunks}')
    self._committed, self._stats = 0, _empty_stats(self.d_model)
    self.writer_version = WRITER_VERSION
    self._arrays = {}
    for name, shape, dt in [(ACTIVATIONS, (0, self.d_model), self.dtype)] + [
        (n, (0,), 'int32') for n in INT_ARRAYS]:
      spec = _array_spec(self._base, name, shape, self.chunk_rows, self.shard_chunks, dt)
      # delete_existing: leftovers of a writer killed before its first commit.
      self._arrays[name] = ts.open(spec, create=True, delete_existing=True,
                                   context=CONTEXT).result()
    self._write_progress()

  def _resume(self, progress, chunk_rows, shard_chunks):
    if (progress['d_model'], progress['dtype']) != (self.d_model, self.dtype):
      raise ValueError(
          f'store at {self.path} was started with d_model={progress["d_model"]}, '
          f'dtype={progress["dtype"]}; reopened with d_model={self.d_model}, dtype={self.dtype}')
    if chunk_rows is not None and int(chunk_rows) != progress['chunk_rows']:
      raise ValueError(f'store at {self.path} has chunk_rows={progress["chunk_rows"]}; '
                       f'reopened with chunk_rows={chunk_rows}')
    if progress['metadata'] != self._metadata:
      logging.warning('store at %s: metadata differs from the one it was started with; '
                      'the new one is kept: %s (was %s)', self.path, self._metadata,
                      progress['metadata'])
    self.chunk_rows, self.shard_chunks = progress['chunk_rows'], progress['shard_chunks']
    self._committed, self._stats = progress['n_rows'], progress['stats']
    self.writer_version = progress['writer_version']  # a resumed store keeps its format
    self._arrays = {name: _open_array(self._base, name, writer_version=self.writer_version)
                    for name in (ACTIVATIONS,) + INT_ARRAYS}
    logging.info('store at %s: resuming after %d committed rows', self.path, self._committed)

  def _write_progress(self):
    _write_json(self._kv, PROGRESS, {
        'format': FORMAT, 'writer_version': self.writer_version, 'd_model': self.d_model,
        'dtype': self.dtype, 'chunk_rows': self.chunk_rows, 'shard_chunks': self.shard_chunks,
        'n_rows': self._committed, 'stats': self._stats, 'metadata': self._metadata})

  @property
  def n_rows(self):
    """Rows appended so far (committed plus buffered)."""
    return self._committed + self._buffered

  @property
  def n_committed(self):
    """Rows durably written; a reopened writer resumes here."""
    return self._committed

  def append(self, activations, tokens=None, doc=None, pos=None):
    """Appends a batch of rows; writes whole shards as soon as they are complete.

    Args:
      activations: float array [n, d_model] (cast to the store dtype).
      tokens, doc, pos: int arrays [n], or None for -1 (unknown, e.g. synthetic data).

    Raises:
      ValueError: a wrong shape, a finished writer, or a non-finite row (nothing of
        the batch is kept; earlier rows are unaffected).
    """
    if self._finished:
      raise ValueError(f'store at {self.path} is finished; append after finish() is not allowed')
    x = np.asarray(activations)
    if x.ndim != 2 or x.shape[1] != self.d_model:
      raise ValueError(f'append to store at {self.path}: activations must have shape '
                       f'[n, {self.d_model}], got {list(x.shape)}')
    x = np.ascontiguousarray(x, dtype=DTYPES[self.dtype])
    finite = np.isfinite(x).all(axis=1)  # after the cast: catches bf16 overflow too
    if not finite.all():
      bad = int(np.argmin(finite))
      raise ValueError(f'append to store at {self.path} refused: row {bad} of the batch '
                       f'(store row {self.n_rows + bad}) is not finite (NaN or Inf); '
                       'nothing of this batch was written')
    columns = [x]
    for name, values in (('tokens', tokens), ('doc', doc), ('pos', pos)):
      if values is None:
        columns.append(np.full(len(x), -1, np.int32))
        continue
      values = np.asarray(values)
      if values.shape != (len(x),):
        raise ValueError(f'append to store at {self.path}: {name} must have shape '
                         f'[{len(x)}], got {list(values.shape)}')
      columns.append(values.astype(np.int32))
    self._buffer.append(columns)
    self._buffered += len(x)
    shard_rows = self.chunk_rows * self.shard_chunks
    complete = (self.n_rows // shard_rows) * shard_rows
    if complete > self._committed:
      self._write(complete - self._committed)

  def flush(self):
    """Writes every buffered row (a trailing partial shard too) and commits."""
    if self._buffered:
      self._write(self._buffered)

  def _write(self, n):
    columns = [np.concatenate(c) for c in zip(*self._buffer)]
    now, rest = [c[:n] for c in columns], [c[n:] for c in columns]
    start, stop = self._committed, self._committed + n
    resized = [a.resize(exclusive_max=[stop] + [None] * (a.rank - 1), expand_only=True)
               for a in self._arrays.values()] if stop > self._array_rows() else []
    for name, future in zip(self._arrays, resized):
      self._arrays[name] = future.result()
    writes = [a[start:stop].write(c) for a, c in zip(self._arrays.values(), now)]
    for w in writes:
      w.result()
    self._stats = _add_stats(self._stats, now[0])
    self._committed = stop
    self._buffer = [rest] if len(rest[0]) else []
    self._buffered = len(rest[0])
    self._write_progress()

  def _array_rows(self):
    return min(a.domain.exclusive_max[0] for a in self._arrays.values())

  def finish(self):
    """Flushes, trims the arrays to `n_rows` and writes manifest.json (last).

    Returns:
      The manifest dict.

    Raises:
      ValueError: when called twice.
    """
    if self._finished:
      raise ValueError(f'store at {self.path} is already finished; finish() was called twice')
    self.flush()
    n = self._committed
    if self._array_rows() != n or max(
        a.domain.exclusive_max[0] for a in self._arrays.values()) != n:
      # A killed writer may have grown the arrays past the committed rows.
      for name, a in list(self._arrays.items()):
        self._arrays[name] = a.resize(exclusive_max=[n] + [None] * (a.rank - 1)).result()
    manifest = dict(self._metadata, format=FORMAT, writer_version=self.writer_version,
                    d_model=self.d_model, dtype=self.dtype, n_tokens=n,
                    chunk_rows=self.chunk_rows, shard_chunks=self.shard_chunks,
                    statistics=_summary(self._stats))
    _write_json(self._kv, MANIFEST, manifest)
    self._kv.write(PROGRESS, None).result()
    self._finished = True
    logging.info('store at %s: finished with %d rows', self.path, n)
    return manifest


# ---- several writers at once ----------------------------------------------------


def process_progress_key(process):
  """The progress file of process `process` in a store filled by several processes."""
  return f'progress.{process}.json'


def _merge_stats(a, b):
  return {'count': a['count'] + b['count'], 'sum_sq_norm': a['sum_sq_norm'] + b['sum_sq_norm'],
          'sum_norm': a['sum_norm'] + b['sum_norm'],
          'sum': (np.asarray(a['sum']) + np.asarray(b['sum'])).tolist()}


class BlockWriter:
  """One process's writer of a store that several processes fill at once, by blocks.

  The rows are cut into blocks of one shard file each (`block_rows = chunk_rows *
  shard_chunks`); block b belongs to process `b % n_processes`, so no two processes
  ever write the same file. `create_block_store` (process 0, before the others
  open it) makes the arrays with 0 rows and `progress.json` with the layout and
  the process count. Each process writes whole blocks through a view of the
  arrays with an unbounded row count (`assume_metadata`: the stored shape is not
  touched, so writers never race on it) and, after each block, its own
  `progress.<p>.json`: the blocks it committed (always its first ones, in order),
  its running statistics and the caller's resume note. `finish_block_store`
  (process 0, once every process has committed its blocks) sums the statistics,
  sets the arrays' shape to exactly `n_rows` (a metadata write), writes
  manifest.json last and removes the progress files.

  A killed process reopens with the same arguments and continues at its first
  uncommitted block; a block half-written when it died is rewritten whole.
  """

  def __init__(self, path, *, process, n_processes):
    """Opens the store made by `create_block_store` for process `process`.

    Raises:
      ValueError: the store was made for another process count, or is finished.
    """
    self.path, self.process = os.fspath(path), int(process)
    self._kv = _open_kv(self.path)
    if _read_json(self._kv, MANIFEST) is not None:
      raise ValueError(f'store at {self.path} is finished (manifest.json present); '
                       'it cannot be appended to; write a new store instead')
    layout = _read_json(self._kv, PROGRESS)
    if layout is None or 'n_processes' not in layout:
      raise ValueError(f'store at {self.path} was not created for several writers '
                       '(no progress.json with n_processes): create it with create_block_store')
    if layout['n_processes'] != n_processes:
      raise ValueError(f'store at {self.path} is being filled by {layout["n_processes"]} '
                       f'processes; reopened by {n_processes}: resume with '
                       f'{layout["n_processes"]} processes, or write a new store')
    self.n_processes = int(n_processes)
    self.d_model, self.dtype = layout['d_model'], layout['dtype']
    self.chunk_rows, self.shard_chunks = layout['chunk_rows'], layout['shard_chunks']
    self.block_rows = self.chunk_rows * self.shard_chunks
    mine = _read_json(self._kv, process_progress_key(self.process)) or {}
    self.committed_blocks = int(mine.get('committed_blocks', 0))
    self.resume_note = mine.get('resume_note')
    self._stats = mine.get('stats') or _empty_stats(self.d_model)
    base, unbounded = kvstore_spec(self.path), 2 ** 62 // max(self.block_rows, 1)
    self._arrays = {}
    for name, shape, dt in [(ACTIVATIONS, (unbounded, self.d_model), self.dtype)] + [
        (n, (unbounded,), 'int32') for n in INT_ARRAYS]:
      spec = _array_spec(base, name, shape, self.chunk_rows, self.shard_chunks, dt)
      self._arrays[name] = ts.open(spec, open=True, assume_metadata=True,
                                   context=CONTEXT).result()

  def owner(self, block):
    """The process that writes block `block`."""
    return block % self.n_processes

  def next_block(self):
    """This process's first uncommitted block."""
    return self.process + self.committed_blocks * self.n_processes

  def write_block(self, block, activations, tokens, doc, pos, *, resume_note=None):
    """Writes the rows of `block` (all `block_rows` of them, fewer only for the last
    block of the store) and commits it.

    Raises:
      ValueError: not this process's next block, a wrong shape, or a non-finite row.
    """
    if block != self.next_block():
      raise ValueError(f'store at {self.path}: process {self.process} must write block '
                       f'{self.next_block()} next, not {block}')
    x = np.ascontiguousarray(activations, dtype=DTYPES[self.dtype])
    if x.ndim != 2 or x.shape[1] != self.d_model or not 0 < len(x) <= self.block_rows:
      raise ValueError(f'store at {self.path}: block {block} must be [1..{self.block_rows}, '
                       f'{self.d_model}] rows, got {list(x.shape)}')
    if not np.isfinite(x).all():
      raise ValueError(f'store at {self.path}: block {block} holds a non-finite row (NaN or '
                       'Inf); nothing of it was written')
    start = block * self.block_rows
    columns = [x] + [np.asarray(c, np.int32) for c in (tokens, doc, pos)]
    writes = [a[start:start + len(x)].write(c) for a, c in zip(self._arrays.values(), columns)]
    for w in writes:
      w.result()
    self._stats = _add_stats(self._stats, x)
    self.committed_blocks += 1
    if resume_note is not None:
      self.resume_note = resume_note
    self._write_progress()

  def note_resume(self, resume_note):
    """Records the caller's resume note (e.g. where to restart reading) without a block."""
    self.resume_note = resume_note
    self._write_progress()

  def _write_progress(self):
    _write_json(self._kv, process_progress_key(self.process), {
        'committed_blocks': self.committed_blocks, 'stats': self._stats,
        'resume_note': self.resume_note})


def create_block_store(path, d_model, dtype='float32', *, chunk_rows=None, shard_chunks=16,
                       metadata, n_processes):
  """Creates (or, when it is already there with the same layout, keeps) a store that
  `n_processes` BlockWriters fill; call on one process before the others open it.

  Returns:
    True when the store was made now, False when it was already there.

  Raises:
    ValueError: a finished store, another layout or process count, or bad arguments.
  """
  path = os.fspath(path)
  kv = _open_kv(path)
  if _read_json(kv, MANIFEST) is not None:
    return False
  if dtype not in DTYPES or int(d_model) <= 0:
    raise ValueError(f'store at {path}: need a dtype among {sorted(DTYPES)} and d_model > 0, '
                     f'got {dtype!r} and {d_model}')
  chunk_rows = int(chunk_rows or default_chunk_rows(int(d_model), dtype))
  layout = {'format': FORMAT, 'writer_version': WRITER_VERSION, 'd_model': int(d_model),
            'dtype': dtype, 'chunk_rows': chunk_rows, 'shard_chunks': int(shard_chunks),
            'n_rows': 0, 'stats': _empty_stats(int(d_model)), 'n_processes': int(n_processes),
            'metadata': _check_metadata(path, metadata)}
  existing = _read_json(kv, PROGRESS)
  if existing is not None:
    differs = [k for k in ('d_model', 'dtype', 'chunk_rows', 'shard_chunks', 'n_processes')
               if existing.get(k) != layout[k]]
    if differs:
      raise ValueError(f'store at {path} was started with '
                       + ', '.join(f'{k}={existing.get(k)}' for k in differs) + '; reopened with '
                       + ', '.join(f'{k}={layout[k]}' for k in differs))
    return False
  base = kvstore_spec(path)
  for name, shape, dt in [(ACTIVATIONS, (0, int(d_model)), dtype)] + [
      (n, (0,), 'int32') for n in INT_ARRAYS]:
    spec = _array_spec(base, name, shape, chunk_rows, int(shard_chunks), dt)
    ts.open(spec, create=True, delete_existing=True, context=CONTEXT).result()
  _write_json(kv, PROGRESS, layout)
  return True


def finish_block_store(path, n_rows):
  """Seals a store filled by BlockWriters: statistics summed, arrays sized to `n_rows`,
  manifest.json written last. Call on one process once every block is committed.

  Returns:
    The manifest dict.

  Raises:
    ValueError: a process has not committed every block of its up to `n_rows`.
  """
  path = os.fspath(path)
  kv = _open_kv(path)
  layout = _read_json(kv, PROGRESS)
  n_processes, block_rows = layout['n_processes'], layout['chunk_rows'] * layout['shard_chunks']
  n_blocks = -(-int(n_rows) // block_rows)
  stats = _empty_stats(layout['d_model'])
  for p in range(n_processes):
    mine = _read_json(kv, process_progress_key(p)) or {'committed_blocks': 0}
    expected = len(range(p, n_blocks, n_processes))
    if mine['committed_blocks'] != expected:
      raise ValueError(f'store at {path}: process {p} committed {mine["committed_blocks"]} '
                       f'blocks of the {expected} it owns in {n_rows} rows')
    if expected:
      stats = _merge_stats(stats, mine['stats'])
  base = kvstore_spec(path)
  for name in (ACTIVATIONS,) + INT_ARRAYS:
    array = _open_array(base, name)
    array.resize(exclusive_max=[int(n_rows)] + [None] * (array.rank - 1),
                 resize_metadata_only=True).result()
  manifest = dict(layout['metadata'], format=FORMAT, writer_version=WRITER_VERSION,
                  d_model=layout['d_model'], dtype=layout['dtype'], n_tokens=int(n_rows),
                  chunk_rows=layout['chunk_rows'], shard_chunks=layout['shard_chunks'],
                  statistics=_summary(stats))
  _write_json(kv, MANIFEST, manifest)
  for key in [PROGRESS] + [process_progress_key(p) for p in range(n_processes)]:
    kv.write(key, None).result()
  logging.info('store at %s: finished with %d rows written by %d processes', path, n_rows,
               n_processes)
  return manifest


def _check_metadata(path, metadata):
  if not isinstance(metadata, dict):
    raise ValueError(f'store at {path}: metadata must be a dict, got {type(metadata).__name__}')
  unknown = sorted(set(metadata) - set(METADATA_KEYS))
  missing = [k for k in _REQUIRED_METADATA if not isinstance(metadata.get(k), str)]
  if unknown or missing:
    raise ValueError(f'store at {path}: metadata keys must be among {list(METADATA_KEYS)} '
                     f'with string {list(_REQUIRED_METADATA)}; unknown: {unknown}, '
                     f'missing or not a string: {missing}')
  extra = metadata.get('extra', {})
  if not isinstance(extra, dict):
    raise ValueError(f'store at {path}: metadata["extra"] must be a dict, got {type(extra).__name__}')
  out = {'model': metadata['model'], 'site': metadata['site'],
         'tokenizer': metadata.get('tokenizer'), 'corpus': metadata.get('corpus'), 'extra': extra}
  # Round-trip through JSON now, so an unserialisable value fails here, not at finish().
  try:
    return json.loads(json.dumps(out))
  except TypeError as e:
    raise ValueError(f'store at {path}: metadata is not JSON-serialisable: {e}') from e


# ---- reader ---------------------------------------------------------------------


class StoreReader:
  """Reads a finished store (or, with `allow_incomplete`, the committed rows of one)."""

  def __init__(self, path, d_model=None, *, allow_incomplete=False):
    """Opens the store.

    Args:
      path: store path or URL (see `kvstore_spec`).
      d_model: expected activation width, or None to accept the store's.
      allow_incomplete: open a store without manifest.json (for inspection): its
        committed rows are readable and `manifest` is None.

    Raises:
      FileNotFoundError: nothing is stored at `path`.
      IncompleteStoreError: manifest.json is missing and `allow_incomplete` is False.
      ValueError: the store's d_model differs from `d_model`.
    """
    self.path = os.fspath(path)
    self._base = kvstore_spec(self.path)
    kv = _open_kv(self.path)
    self.manifest = _read_json(kv, MANIFEST)
    self.progress = _read_json(kv, PROGRESS)
    if self.manifest is None:
      if self.progress is None:
        raise FileNotFoundError(f'no activation store at {self.path}: neither manifest.json '
                                'nor progress.json found')
      if not allow_incomplete:
        raise IncompleteStoreError(
            f'store at {self.path} is incomplete: manifest.json missing; '
            f'{self.progress["n_rows"]} rows written so far; finish the harvest/writer or resume it')
    info = self.manifest or self.progress
    self.complete = self.manifest is not None
    self.d_model, self.dtype = info['d_model'], info['dtype']
    self.chunk_rows, self.shard_chunks = info['chunk_rows'], info['shard_chunks']
    self.n_rows = info['n_tokens'] if self.complete else info['n_rows']
    if d_model is not None and int(d_model) != self.d_model:
      raise ValueError(f'store at {self.path} has d_model={self.d_model}, expected {d_model}')
    self.writer_version = info.get('writer_version', 1)
    self._arrays = {name: _open_array(self._base, name, writer_version=self.writer_version)
                    for name in (ACTIVATIONS,) + INT_ARRAYS}

  @property
  def n_chunks(self):
    """Read chunks covering the rows (the last one may be partial)."""
    return -(-self.n_rows // self.chunk_rows)

  def _check_range(self, start, stop):
    if not 0 <= start <= stop <= self.n_rows:
      raise IndexError(f'store at {self.path}: rows [{start}, {stop}) out of range [0, {self.n_rows})')

  def read_rows_async(self, start, stop):
    """Starts reading activation rows [start, stop); `.result()` of what it returns is
    the array, or raises `StoreReadError` / `NonFiniteRowsError` naming the rows."""
    self._check_range(start, stop)
    return _PendingRows(self, start, stop, self._arrays[ACTIVATIONS][start:stop].read())

  def read_rows(self, start, stop):
    """Activation rows [start, stop) in the store dtype, [stop - start, d_model].

    Raises:
      StoreReadError: a chunk holding them is missing, truncated or corrupt.
      NonFiniteRowsError: some of them hold NaN or Inf.
    """
    return self.read_rows_async(start, stop).result()

  def read_indices(self, indices, max_chunks_at_once=64):
    """Activation rows at arbitrary indices, reading the whole chunks that hold them.

    Args:
      indices: int array [n] of row indices (any order, repeats allowed).
      max_chunks_at_once: chunks held in memory at once (bounds memory for scattered indices).

    Returns:
      [n, d_model] array in the store dtype, rows in the order of `indices`.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self.n_rows):
      raise IndexError(f'store at {self.path}: indices out of range [0, {self.n_rows}): '
                       f'min {indices.min()}, max {indices.max()}')
    out = np.empty((len(indices), self.d_model), DTYPES[self.dtype])
    chunks, inverse = np.unique(indices // self.chunk_rows, return_inverse=True)
    cr = self.chunk_rows
    for g in range(0, len(chunks), max_chunks_at_once):
      group = chunks[g:g + max_chunks_at_once]
      futures = [self.read_rows_async(c * cr, min((c + 1) * cr, self.n_rows)) for c in group]
      buf = np.zeros((len(group) * cr, self.d_model), out.dtype)
      for i, f in enumerate(futures):
        data = f.result()
        buf[i * cr:i * cr + len(data)] = data
      sel = (inverse >= g) & (inverse < g + len(group))
      out[sel] = buf[(inverse[sel] - g) * cr + indices[sel] % cr]
    return out

  def _read_int(self, name, start, stop):
    self._check_range(start, stop)
    return _read_or_raise(self.path, name, start, stop, self._arrays[name][start:stop].read())

  def read_tokens(self, start, stop):
    """Token ids of rows [start, stop) (int32; -1 where unknown)."""
    return self._read_int('tokens', start, stop)

  def read_doc(self, start, stop):
    """Document indices of rows [start, stop) (int32; -1 where unknown)."""
    return self._read_int('doc', start, stop)

  def read_pos(self, start, stop):
    """Positions in document of rows [start, stop) (int32; -1 where unknown)."""
    return self._read_int('pos', start, stop)

  def missing_shard_files(self):
    """The shard files the rows need that are not stored (a cheap listing, no reads).

    Returns:
      [(key under the store, [first row, end row))]; empty for an intact layout (a
      chunk missing inside a present file is found only by reading: `verify_store`).
    """
    shard_rows = self.chunk_rows * self.shard_chunks
    missing = []
    # Version-1 writers skipped int chunks of zeros: only their activations are always there.
    for name in (ACTIVATIONS,) + (INT_ARRAYS if self.writer_version >= 2 else ()):
      kv = ts.KvStore.open(_sub_spec(self._base, name), context=CONTEXT).result()
      present = {key.decode() for key in kv.list().result()}
      for i in range(-(-self.n_rows // shard_rows)):
        key = f'c/{i}/0' if name == ACTIVATIONS else f'c/{i}'
        if key not in present:
          rows = [i * shard_rows, min((i + 1) * shard_rows, self.n_rows)]
          missing.append((f'{name}/{key}', rows))
    return missing

  def layout(self):
    """The arrays' chunking and codecs, for inspection."""
    act = self._arrays[ACTIVATIONS]
    return {'chunk_rows': self.chunk_rows, 'shard_chunks': self.shard_chunks,
            'shard_rows': self.chunk_rows * self.shard_chunks, 'n_chunks': self.n_chunks,
            'chunk_bytes': self.chunk_rows * self.d_model * DTYPES[self.dtype].itemsize,
            'array_shape': list(act.shape),
            'codecs': {name: a.codec.to_json() for name, a in self._arrays.items()}}


# ---- integrity ------------------------------------------------------------------


def _read_or_raise(path, name, start, stop, future):
  """The result of a TensorStore read of rows [start, stop) of array `name`, or a
  StoreReadError that names the store, the array and the rows."""
  try:
    return future.result()
  except Exception as e:  # pylint: disable=broad-except  # TensorStore's status errors
    cause = ' '.join(str(e).split())[:400]
    raise StoreReadError(
        f'store at {path}: {name} rows [{start}, {stop}) cannot be read: {cause}. The store '
        f'is damaged (a chunk file missing, truncated or changed); `python tools/inspect_store.py '
        f'{path} --verify` lists every bad chunk; harvest it again or restore it from a copy'
    ) from e


def finite_rows(x):
  """Boolean [n]: which rows of a float32 or bfloat16 array [n, d] are all finite."""
  if x.dtype == DTYPES['bfloat16']:  # numpy's isfinite is slow on ml_dtypes; test the exponent
    return ((x.view(np.uint16) & 0x7F80) != 0x7F80).all(axis=1)
  return np.isfinite(x).all(axis=1)


def check_finite(path, x, first_row):
  """Raises NonFiniteRowsError naming the rows of `x` (store rows from `first_row`) that
  hold NaN or Inf."""
  finite = finite_rows(x)
  if finite.all():
    return
  bad = first_row + np.flatnonzero(~finite)
  shown = ', '.join(str(r) for r in bad[:10]) + (', ...' if len(bad) > 10 else '')
  raise NonFiniteRowsError(
      f'store at {path}: {len(bad)} row(s) hold NaN or Inf: rows {shown} (of rows '
      f'[{first_row}, {first_row + len(x)})). dictlearn\'s writer refuses such rows; this store '
      'was written elsewhere or damaged: remove those rows or harvest it again')


class _PendingRows:
  """A read of activation rows in flight; `result()` returns them checked."""

  def __init__(self, reader, start, stop, future):
    self._reader, self._start, self._stop, self._future = reader, start, stop, future

  def result(self):
    data = _read_or_raise(self._reader.path, ACTIVATIONS, self._start, self._stop, self._future)
    check_finite(self._reader.path, data, self._start)
    return data


def verify_store(path, progress=None):
  """Reads every chunk of a store and checks it against the manifest.

  Checks that each array has the manifest's row count, that every chunk is
  present and readable (and passes its crc32c, in stores that have one), that
  every activation row is finite, and that the statistics recomputed from all
  rows equal those recorded in the manifest (which catches changed values in
  stores without checksums).

  Args:
    path: store path or URL.
    progress: optional callable(rows_done, n_rows), for a progress bar.

  Returns:
    {'path', 'n_rows', 'n_chunks', 'writer_version', 'bad_chunks': [{'array', 'rows',
    'error'}], 'nonfinite_rows': [first 100], 'n_nonfinite_rows', 'statistics':
    {'recorded', 'recomputed', 'match'} (None for an incomplete store), 'ok'}.

  Raises:
    FileNotFoundError / IncompleteStoreError: as `StoreReader` (an incomplete store
      is verified up to its committed rows).
  """
  reader = StoreReader(path, allow_incomplete=True)
  n, cr = reader.n_rows, reader.chunk_rows
  report = {'path': reader.path, 'n_rows': n, 'n_chunks': reader.n_chunks,
            'writer_version': reader.writer_version, 'complete': reader.complete,
            'bad_chunks': [], 'nonfinite_rows': [], 'n_nonfinite_rows': 0}
  arrays = reader._arrays  # pylint: disable=protected-access  # this module's own reader
  for name, array in arrays.items():
    if array.domain.exclusive_max[0] < n:
      report['bad_chunks'].append({'array': name, 'rows': [array.domain.exclusive_max[0], n],
                                   'error': f'the array holds {array.domain.exclusive_max[0]} '
                                            f'rows, the manifest {n}'})
  stats = _empty_stats(reader.d_model)
  for c in range(reader.n_chunks):
    start, stop = c * cr, min((c + 1) * cr, n)
    for name in (ACTIVATIONS,) + INT_ARRAYS:
      try:
        data = _read_or_raise(reader.path, name, start, stop, arrays[name][start:stop].read())
      except StoreReadError as e:
        report['bad_chunks'].append({'array': name, 'rows': [start, stop],
                                     'error': str(e.__cause__).split('\n')[0][:300]})
        continue
      if name == ACTIVATIONS:
        finite = finite_rows(data)
        bad = start + np.flatnonzero(~finite)
        report['n_nonfinite_rows'] += len(bad)
        room = 100 - len(report['nonfinite_rows'])
        report['nonfinite_rows'].extend(int(r) for r in bad[:max(room, 0)])
        stats = _add_stats(stats, data[finite])
    if progress is not None:
      progress(stop, n)
  recorded = (reader.manifest or {}).get('statistics')
  report['statistics'] = None
  if recorded is not None and not report['bad_chunks'] and not report['n_nonfinite_rows']:
    recomputed = _summary(stats)
    keys = ('count', 'mean_sq_norm', 'mean_norm', 'norm_of_mean')
    match = recomputed['count'] == recorded['count'] and all(
        np.isclose(recomputed[k], recorded[k], rtol=1e-6, atol=1e-12) for k in keys[1:])
    match = match and np.allclose(recomputed['mean'], recorded['mean'], rtol=1e-5, atol=1e-7)
    report['statistics'] = {'recorded': {k: recorded[k] for k in keys},
                            'recomputed': {k: recomputed[k] for k in keys}, 'match': bool(match)}
  report['ok'] = (not report['bad_chunks'] and not report['n_nonfinite_rows']
                  and (report['statistics'] is None or report['statistics']['match']))
  return report
