"""A harvest split over the processes of a multi-host run: one store per site, filled by all.

The rows of a site are the same deterministic stream as in a single-process
harvest (`dictlearn.harvest`): every process packs the whole corpus (tokenizing
is cheap beside the model's forward pass) and so knows where each context's rows
fall. The stream is cut into blocks of one store shard file each; block b is
process `b % n_processes`'s (`dictlearn.data.store.BlockWriter`), and each process
runs the model only over the contexts whose rows reach one of its blocks: the
processes take disjoint shards of the corpus, and no two write the same file.

Commit and resume. A process commits a block at a time (its shard file, then its
own `progress.<p>.json` in the store, with the packing state where its next block
starts). Killed and rerun with the same command and process count, each process
restarts packing there and writes only its uncommitted blocks. When every process
is done (a barrier), process 0 sums the statistics, writes each store's manifest
(`finish_block_store`) and then harvest.json's summary: both last.

The result equals a single-process harvest of the same config: the same rows,
tokens and positions; activations equal up to float rounding (the model runs
over other batches of contexts).
"""
import logging
import sys
import time

import numpy as np
import tqdm

from dictlearn import distributed
from dictlearn import logs
from dictlearn.data import corpus as corpus_lib
from dictlearn.data import store as store_lib
from dictlearn.lm import llama

log = logging.getLogger(__name__)


def open_writers(config, out_dir, sites, d_model, metadata, n_processes):
  """Process 0 creates every site's store, the others wait; then each process opens its
  writers. Returns {site: BlockWriter}."""
  paths = {site: f'{out_dir}/{site}' for site in sites}
  if distributed.is_primary():
    for site, path in paths.items():
      store_lib.create_block_store(
          path, d_model, config.store_dtype, chunk_rows=config.store_chunk_rows or None,
          shard_chunks=config.store_shard_chunks, metadata=dict(metadata, site=site),
          n_processes=n_processes)
  distributed.barrier('dictlearn harvest stores created')
  return {site: store_lib.BlockWriter(path, process=distributed.process_index(),
                                      n_processes=n_processes)
          for site, path in paths.items()}


class _Blocks:
  """This process's blocks being assembled from forwarded contexts, for every site."""

  def __init__(self, writers, d_model):
    self.writers = writers
    first = next(iter(writers.values()))
    self.block_rows, self.n_processes = first.block_rows, first.n_processes
    self.process = first.process
    self.d_model = d_model
    self.next = min(w.next_block() for w in writers.values())
    self._buffers = {}  # block -> {site: activations, 'tokens'|'doc'|'pos': ...}, filled rows
    self.points = {}  # block -> resume note of its first context

  def owned(self, block):
    return block % self.n_processes == self.process and block >= self.next

  def blocks_of(self, lo, hi):
    """This process's uncommitted blocks among those rows [lo, hi) reach."""
    if hi <= lo:
      return []
    return [b for b in range(lo // self.block_rows, (hi - 1) // self.block_rows + 1)
            if self.owned(b)]

  def remember(self, block, note):
    """The packing state where `block`'s first context starts (what a resume needs)."""
    if block in self.points:
      return
    self.points[block] = note
    if block == self.next:
      for w in self.writers.values():
        if w.next_block() == block:
          w.note_resume(note)

  def add(self, lo, rows, columns):
    """Puts rows (global rows [lo, lo + n)) of every site and their columns in place."""
    n = len(columns['tokens'])
    for b in self.blocks_of(lo, lo + n):
      start = b * self.block_rows
      a, z = max(lo, start), min(lo + n, start + self.block_rows)
      if b not in self._buffers:
        self._buffers[b] = ({k: np.zeros((self.block_rows, self.d_model), np.float32)
                             for k in rows} | {k: np.zeros(self.block_rows, np.int32)
                                               for k in columns}, [0])
      buffer, filled = self._buffers[b]
      for key, values in list(rows.items()) + list(columns.items()):
        buffer[key][a - start:z - start] = values[a - lo:z - lo]
      filled[0] += z - a

  def write_complete(self, n_rows=None):
    """Writes the blocks whose rows are all there (with the stream's end `n_rows`
    known, the last, partial block too), in order."""
    while self.next in self._buffers:
      b = self.next
      buffer, filled = self._buffers[b]
      size = self.block_rows if n_rows is None else min(self.block_rows,
                                                        n_rows - b * self.block_rows)
      if filled[0] < size or size <= 0:
        return
      note = self.points.get(b + self.n_processes)
      for site, w in self.writers.items():
        if w.next_block() == b:  # a site may be ahead after a kill between two sites
          w.write_block(b, buffer[site][:size], buffer['tokens'][:size], buffer['doc'][:size],
                        buffer['pos'][:size], resume_note=note)
      del self._buffers[b]
      self.next = b + self.n_processes

  def pending_rows(self):
    return sum(f[0] for _, f in self._buffers.values())


def resume_point(writers):
  """(rows, PackState) where this process's packing restarts: its earliest note."""
  notes = [w.resume_note for w in writers.values()]
  if any(n is None for n in notes):
    return 0, corpus_lib.PackState()
  note = min(notes, key=lambda n: n['rows'])
  return note['rows'], corpus_lib.PackState.from_json(note['state'])


def run(config, out_dir, corpus, lm, writers):
  """The loop of one process: pack everything, forward the contexts of its blocks, write
  them. Returns (n_tokens, last {'contexts', 'documents'}, exhausted, seconds, written rows)."""
  lm_cfg, params, tokenizer = lm
  sites, target, batch_size = tuple(writers), config.token_budget, config.batch_size
  blocks = _Blocks(writers, lm_cfg.d_model)
  rows, state = resume_point(writers)
  if rows:
    logs.stage('resuming harvest in %s: process %d restarts packing at row %d', out_dir,
               blocks.process, rows)
  contexts = corpus_lib.pack_contexts(corpus, tokenizer.encode_batch, tokenizer.bos_id,
                                      config.context_length, start=state)
  pad = np.full((config.context_length,), tokenizer.bos_id, np.int32)
  start_time, written = time.perf_counter(), 0
  progress = tqdm.tqdm(total=None if target < 0 else target, unit='tok', unit_scale=True,
                       desc='harvest', file=sys.stderr, dynamic_ncols=True,
                       disable=not (config.progress and distributed.is_primary()))

  def forward(batch):
    tokens = np.stack([c.tokens for c, _ in batch] + [pad] * (batch_size - len(batch)))
    _, acts = llama.forward(params, lm_cfg, tokens, read_sites=sites, return_logits=False,
                            stop_at_deepest=True)
    return acts

  def place(batch, acts):
    nonlocal written
    for i, (c, lo) in enumerate(batch):
      mask = c.row_mask(config.exclude_bos)
      n = int(mask.sum()) if target < 0 else max(0, min(int(mask.sum()), target - lo))
      site_rows = {s: np.asarray(acts[s][i])[mask][:n] for s in sites}
      blocks.add(lo, site_rows, {k: getattr(c, k)[mask][:n] for k in ('tokens', 'doc', 'pos')})
      written += n
    blocks.write_complete()

  last = {'contexts': 0, 'documents': 0}
  exhausted, batch, in_flight = True, [], None
  try:
    for c in contexts:
      if 0 <= target <= rows:
        exhausted = False
        break
      docs = c.doc[c.row_mask(config.exclude_bos)]
      k = len(docs)
      if k and (target < 0 or rows < target):
        used = k if target < 0 else min(k, target - rows)
        last = {'contexts': c.start.context + 1, 'documents': int(docs[used - 1]) + 1}
      hi = rows + k if target < 0 else min(rows + k, target)
      mine = blocks.blocks_of(rows, hi)
      if mine:
        for b in mine:
          blocks.remember(b, {'rows': rows, 'state': c.start.to_json()})
        batch.append((c, rows))
        if len(batch) == batch_size:
          acts = forward(batch)  # dispatched asynchronously: runs while the last is placed
          if in_flight is not None:
            place(*in_flight)
          in_flight, batch = (batch, acts), []
      rows += k
      progress.update(min(rows, target) - progress.n if target >= 0 else k)
    if batch:
      acts = forward(batch)
      if in_flight is not None:
        place(*in_flight)
      in_flight = (batch, acts)
    if in_flight is not None:
      place(*in_flight)
  finally:
    progress.close()
  if 0 <= target <= rows:
    exhausted = False
  n_tokens = rows if target < 0 else min(rows, target)
  blocks.write_complete(n_tokens)
  if blocks.pending_rows():
    raise RuntimeError(f'harvest in {out_dir}: process {blocks.process} holds '
                       f'{blocks.pending_rows()} rows of blocks it did not write')
  return n_tokens, last, exhausted, time.perf_counter() - start_time, written
