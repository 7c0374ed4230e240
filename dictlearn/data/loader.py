"""Training batches from an activation store: step -> rows, prefetch, normalisation.

Order. Train rows are `[0, n_train)` with `n_train = n_rows - heldout_tokens`, cut
into the store's read chunks (the last may be partial). Epoch `e` permutes the
chunks with a generator seeded by (seed, e); consecutive runs of
`shuffle_window_chunks` chunks in that order form windows; the rows of window `w`
are shuffled by (seed, e, w). Concatenating the shuffled windows of epoch 0, 1, ...
gives an endless stream in which every train row appears exactly once per epoch,
and step `i` takes stream positions `[i * B, (i + 1) * B)`. So the rows of a step
are a pure function of (seed, i): resume is replay from the step.

Reading. A window's chunks are read whole (one TensorStore read per chunk, issued
together) while the previous window is still being consumed, then the batches
gather from that buffer. Each process takes only the rows its devices hold (its
contiguous slice of the batch) and puts only those on its devices
(`jax.make_array_from_process_local_data`), though it reads the whole window: the
shuffle spreads every process's rows over the window's chunks, and a chunk is
the store's unit of reading. `rows_read` counts what was read.
"""
import logging
import queue
import threading

import jax
import ml_dtypes
import numpy as np

from dictlearn.data import store as store_lib

_OUTPUT_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}


def normalization_scale(reader):
  """The factor that makes the store's mean squared row norm equal to d_model.

  Args:
    reader: a `StoreReader` of a finished store (its manifest holds the statistics).

  Returns:
    sqrt(d_model / mean_sq_norm), from the manifest statistics (all rows of the
    store, held-out ones included).
  """
  if reader.manifest is None:
    raise ValueError(f'store at {reader.path} has no manifest; its statistics are unknown')
  mean_sq_norm = reader.manifest['statistics']['mean_sq_norm']
  if not mean_sq_norm > 0:
    raise ValueError(f'store at {reader.path}: mean squared row norm is {mean_sq_norm}; '
                     'cannot normalise rows that are all zero')
  return float(np.sqrt(reader.d_model / mean_sq_norm))


class ShuffleOrder:
  """The pure map from stream position to train row (see the module docstring).

  Caches the current epoch's chunk permutation and the last few windows'
  shuffles, so that consecutive steps cost O(batch) amortised. Not thread-safe:
  give each thread its own.
  """

  def __init__(self, *, n_train, chunk_rows, window_chunks, seed):
    self.n_train, self.chunk_rows = int(n_train), int(chunk_rows)
    self.window_chunks, self.seed = int(window_chunks), int(seed)
    self.n_chunks = -(-self.n_train // self.chunk_rows)
    self.n_windows = -(-self.n_chunks // self.window_chunks)
    self._chunk_len = np.full(self.n_chunks, self.chunk_rows, np.int64)
    self._chunk_len[-1] = self.n_train - (self.n_chunks - 1) * self.chunk_rows
    self._epoch_cache = {}
    self._window_cache = {}

  def _epoch(self, e):
    """(chunk permutation, window start offsets [n_windows + 1]) of epoch e."""
    if e not in self._epoch_cache:
      perm = np.random.default_rng([self.seed, 0, e]).permutation(self.n_chunks)
      sizes = np.add.reduceat(self._chunk_len[perm], np.arange(0, self.n_chunks, self.window_chunks))
      _put(self._epoch_cache, e, (perm, np.concatenate([[0], np.cumsum(sizes)])), keep=2)
    return self._epoch_cache[e]

  def window(self, e, w):
    """(chunk ids, rows in chunk order, shuffle of positions) of window w of epoch e."""
    key = (e, w)
    if key not in self._window_cache:
      perm, starts = self._epoch(e)
      chunks = perm[w * self.window_chunks:(w + 1) * self.window_chunks]
      rows = np.concatenate([np.arange(c * self.chunk_rows, c * self.chunk_rows + self._chunk_len[c])
                             for c in chunks])
      shuffle = np.random.default_rng([self.seed, 1, e, w]).permutation(starts[w + 1] - starts[w])
      _put(self._window_cache, key, (chunks, rows, shuffle), keep=3)
    return self._window_cache[key]

  def next_window(self, e, w):
    """The window after (e, w) in the stream."""
    return (e, w + 1) if w + 1 < self.n_windows else (e + 1, 0)

  def pieces(self, start, stop):
    """Yields (e, w, lo, hi): stream positions [start, stop) as runs within windows."""
    pos = start
    while pos < stop:
      e, offset = divmod(pos, self.n_train)
      _, starts = self._epoch(e)
      w = int(np.searchsorted(starts, offset, side='right')) - 1
      lo = offset - starts[w]
      hi = min(starts[w + 1] - starts[w], lo + stop - pos)
      yield e, w, int(lo), int(hi)
      pos += hi - lo

  def rows(self, start, stop):
    """Train row ids (int64) at stream positions [start, stop)."""
    parts = [self.window(e, w)[1][self.window(e, w)[2][lo:hi]]
             for e, w, lo, hi in self.pieces(start, stop)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _put(cache, key, value, keep):
  cache[key] = value
  while len(cache) > keep:
    del cache[next(iter(cache))]  # dicts keep insertion order: drop the oldest


def _check_counts(reader, heldout_tokens, batch_size):
  if heldout_tokens < 0 or batch_size <= 0:
    raise ValueError(f'need heldout_tokens >= 0 and batch_size > 0, got {heldout_tokens} '
                     f'and {batch_size}')
  n_train = reader.n_rows - heldout_tokens
  if n_train < batch_size:
    raise ValueError(f'store at {reader.path} has {reader.n_rows} rows; with heldout_tokens='
                     f'{heldout_tokens} that leaves {n_train} training rows, fewer than one '
                     f'global batch of {batch_size}')
  return n_train


def _local_rows(sharding, batch_size, d_model):
  """This process's contiguous row range [lo, hi) of the global batch, and a check."""
  if sharding is None:
    if jax.process_count() > 1:
      raise ValueError('a multi-process loader needs a sharding for the global batch')
    return 0, batch_size
  mesh_shape = dict(sharding.mesh.shape)
  data = mesh_shape.get('data')
  if data is None:
    raise ValueError(f"the batch sharding's mesh has no 'data' axis (mesh {mesh_shape})")
  if batch_size % data or batch_size % jax.process_count():
    what = (f'the data axis size {data}' if batch_size % data
            else f'the process count {jax.process_count()}')
    raise ValueError(f'global batch size {batch_size} is not divisible by {what} (mesh {mesh_shape})')
  spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in
                  sharding.addressable_devices_indices_map((batch_size, d_model)).values()})
  lo, hi = spans[0][0], spans[-1][1]
  covered = lo
  for a, b in spans:
    if a > covered:
      raise ValueError(f'the rows of the batch held by process {jax.process_index()} are not '
                       f'contiguous: {spans}; lay the mesh out so that they are')
    covered = max(covered, b)
  return lo, hi


def _convert(raw, scale, dtype):
  x = raw.astype(np.float32)
  x *= np.float32(scale)
  return x if dtype == np.float32 else x.astype(dtype)


def _output_dtype(dtype):
  if dtype not in _OUTPUT_DTYPES:
    raise ValueError(f'output dtype {dtype!r} is not one of {sorted(_OUTPUT_DTYPES)}')
  return _OUTPUT_DTYPES[dtype]


def _globalize(sharding, local, batch_size):
  if sharding is None:
    return local
  return jax.make_array_from_process_local_data(sharding, local, (batch_size, local.shape[1]))


class Loader:
  """Endless iterator of training batches, read ahead on a background thread.

  Yields [batch_size, d_model] global `jax.Array`s sharded by `sharding` (or numpy
  arrays when `sharding` is None, single process), scaled by `scale`. `step` is
  the step of the next batch. Use as a context manager, or call `close()`.
  """

  def __init__(self, reader, *, batch_size, seed, shuffle_window_chunks, heldout_tokens, scale,
               sharding, prefetch, start_step=0, dtype='float32'):
    """Validates the arguments and starts the read-ahead thread.

    Args:
      reader: `StoreReader` of the store.
      batch_size: global rows per step.
      seed: data-order seed.
      shuffle_window_chunks: chunks mixed in one shuffle window.
      heldout_tokens: rows at the end of the store kept out of training.
      scale: factor applied to every row (see `normalization_scale`; 1.0 for none).
      sharding: `NamedSharding` of the [batch_size, d_model] batch, batch axis over
        'data'; None for plain numpy batches.
      prefetch: batches read ahead (queue bound).
      start_step: first step to yield; resume from a checkpoint at step k with k.
      dtype: output dtype, 'float32' or 'bfloat16'.

    Raises:
      ValueError: a batch size not divisible by the data axis or process count,
        too few rows, or bad counts.
    """
    self.reader, self.batch_size, self.seed = reader, int(batch_size), int(seed)
    self.n_train = _check_counts(reader, heldout_tokens, self.batch_size)
    if shuffle_window_chunks < 1 or prefetch < 1 or start_step < 0 or not np.isfinite(scale):
      raise ValueError(f'need shuffle_window_chunks >= 1, prefetch >= 1, start_step >= 0 and a '
                       f'finite scale; got {shuffle_window_chunks}, {prefetch}, {start_step}, {scale}')
    self.scale, self.sharding, self.dtype = float(scale), sharding, _output_dtype(dtype)
    self._order_args = dict(n_train=self.n_train, chunk_rows=reader.chunk_rows,
                            window_chunks=shuffle_window_chunks, seed=self.seed)
    self._order = ShuffleOrder(**self._order_args)
    self._local = _local_rows(sharding, self.batch_size, reader.d_model)
    self.step = int(start_step)
    self.rows_read = 0  # rows read from the store so far (read-ahead included)
    self._queue = queue.Queue(maxsize=int(prefetch))
    self._stop = threading.Event()
    self._failure = None
    self._thread = threading.Thread(target=self._run, name='dictlearn-loader', daemon=True)
    self._thread.start()

  def batch_rows(self, step):
    """Global row ids (int64 [batch_size]) of step `step`: a pure function of (seed, step)."""
    return self._order.rows(step * self.batch_size, (step + 1) * self.batch_size)

  # ---- background thread ------------------------------------------------------

  def _run(self):
    order, windows = ShuffleOrder(**self._order_args), {}
    step = self.step
    try:
      while not self._stop.is_set():
        local = self._read_local(order, windows, step)
        while not self._stop.is_set():
          try:
            self._queue.put((step, local), timeout=0.1)
            break
          except queue.Full:
            continue
        step += 1
    except Exception as e:  # handed to the consumer, which re-raises it with context
      self._queue.put((step, e))

  def _read_local(self, order, windows, step):
    lo, hi = self._local
    start = step * self.batch_size
    parts = []
    for e, w, a, b in order.pieces(start + lo, start + hi):
      data = self._window_data(order, windows, e, w)
      parts.append(data[order.window(e, w)[2][a:b]])
    raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return _convert(raw, self.scale, self.dtype)

  def _window_data(self, order, windows, e, w):
    """Window (e, w)'s rows in chunk order; starts reading the next window too."""
    nxt = order.next_window(e, w)
    for key in list(windows):
      if key not in ((e, w), nxt):
        del windows[key]
    for key in ((e, w), nxt):
      if key not in windows:
        cr, n = self.reader.chunk_rows, self.n_train
        spans = [(c * cr, min((c + 1) * cr, n)) for c in order.window(*key)[0]]
        windows[key] = [self.reader.read_rows_async(a, b) for a, b in spans]
        self.rows_read += sum(b - a for a, b in spans)
    if isinstance(windows[(e, w)], list):
      chunks = [f.result() for f in windows[(e, w)]]
      windows[(e, w)] = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    return windows[(e, w)]

  # ---- consumer ----------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self):
    if self._failure is not None:
      raise self._failure
    if self._stop.is_set():
      raise RuntimeError(f'loader over store {self.reader.path} is closed')
    while True:
      try:
        step, item = self._queue.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError(f'loader over store {self.reader.path}: the prefetch thread '
                             f'exited before producing step {self.step}') from None
    if isinstance(item, Exception):
      if isinstance(item, (store_lib.StoreReadError, store_lib.NonFiniteRowsError)):
        self._failure = item  # a damaged chunk, non-finite rows: named with store and rows
      else:
        self._failure = RuntimeError(f'loader over store {self.reader.path}: reading step {step} '
                                     f'failed in the prefetch thread: {item!r}')
        self._failure.__cause__ = item
      self.close()
      raise self._failure
    if step != self.step:  # an invariant of this class, not a user error
      raise RuntimeError(f'loader produced step {step}, expected {self.step}')
    self.step += 1
    return _globalize(self.sharding, item, self.batch_size)

  def close(self):
    """Stops the read-ahead thread; idempotent."""
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get_nowait()  # unblock a put
      except queue.Empty:
        pass
      self._thread.join(timeout=0.05)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def heldout_batches(reader, batch_size, n_batches, *, heldout_tokens, scale, sharding,
                    dtype='float32'):
  """The held-out rows (the last `heldout_tokens` of the store), in order, as batches.

  Args:
    reader: `StoreReader`.
    batch_size: global rows per batch.
    n_batches: batches to yield; n_batches * batch_size must not exceed heldout_tokens.
    heldout_tokens: rows held out at the end of the store (as given to `Loader`).
    scale: factor applied to every row.
    sharding: `NamedSharding` of the batch, or None for numpy batches.
    dtype: output dtype, 'float32' or 'bfloat16'.

  Yields:
    [batch_size, d_model] arrays, like `Loader`.
  """
  if not 0 <= heldout_tokens <= reader.n_rows or batch_size <= 0 or n_batches < 0:
    raise ValueError(f'need 0 <= heldout_tokens <= {reader.n_rows} (the rows of store '
                     f'{reader.path}), batch_size > 0 and n_batches >= 0; got {heldout_tokens}, '
                     f'{batch_size}, {n_batches}')
  if n_batches * batch_size > heldout_tokens:
    raise ValueError(f'{n_batches} held-out batches of {batch_size} need {n_batches * batch_size} '
                     f'rows; only heldout_tokens={heldout_tokens} are held out of store '
                     f'{reader.path}')
  out_dtype = _output_dtype(dtype)
  lo, hi = _local_rows(sharding, batch_size, reader.d_model)
  first = reader.n_rows - heldout_tokens
  logging.info('held-out evaluation: %d batches of %d rows from row %d of %s',
               n_batches, batch_size, first, reader.path)
  for b in range(n_batches):
    start = first + b * batch_size
    local = _convert(reader.read_rows(start + lo, start + hi), scale, out_dtype)
    yield _globalize(sharding, local, batch_size)
