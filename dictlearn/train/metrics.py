"""Metric records: JSONL and TensorBoard event files in the workdir, and a progress bar.

A training record holds the step's metrics and the throughput: tokens_per_second,
flops_per_token and mfu (`dictlearn.train.throughput`), data_wait_fraction. In a
multi-process run only process 0 writes (`MetricWriter(enabled=...)`).

A process killed while appending to metrics.jsonl leaves a torn last line: readers
skip it with a warning (`read_metrics`), and the next writer cuts it off before
appending (`MetricWriter`), so that it never ends up in the middle of the file.
"""
import json
import logging
import math
import os
import sys
import time

import numpy as np
import tqdm
from tensorboardX import SummaryWriter

log = logging.getLogger(__name__)


def to_python(metrics: dict) -> dict:
  """Device scalars -> plain Python floats/ints (one host transfer per call)."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    out[name] = value.item() if value.ndim == 0 else value.tolist()
  return out


class MetricWriter:
  """Writes metric records to `workdir/metrics.jsonl` and TensorBoard events.

  The JSONL file is appended to, so a resumed run continues the same file;
  records carry their step, so a reader can drop repeats after a resume.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    """Opens the files; with `enabled` False (a process other than 0 of a multi-process
    run) nothing is opened and `write` does nothing."""
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._file = self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    drop_torn_tail(self.path)
    self._file = open(self.path, 'a', encoding='utf-8')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard')) if tensorboard else None

  def write(self, step: int, metrics: dict, prefix: str = 'train') -> None:
    if self._file is None:
      return
    record = {'step': int(step), 'split': prefix, **metrics}
    try:
      self._file.write(json.dumps(record) + '\n')
      self._file.flush()
    except OSError as e:  # a full disk: say which file
      raise OSError(e.errno, f'writing {self.path}: {e.strerror}') from e
    if self._tb is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(f'{prefix}/{name}', value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      try:
        self._file.close()
      except OSError as e:  # after a failed write (a full disk), already reported
        log.info('closing %s: %s', self.path, e)
    if self._tb is not None:
      self._tb.close()


def drop_torn_tail(path: str) -> None:
  """Cuts a torn last line (no newline: a kill mid-write) off a JSONL file, with a warning."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(max(0, size - 65536))
    tail = f.read()
    if tail.endswith(b'\n'):
      return
    cut = size - len(tail) + tail.rfind(b'\n') + 1 if b'\n' in tail else 0
    f.seek(cut)
    try:
      json.loads(f.read())
      f.write(b'\n')  # a whole record whose newline was lost: keep it
      return
    except ValueError:
      pass
    log.warning('%s: dropped a torn last line (%d bytes, left by a process killed while '
                'writing it)', path, size - cut)
    f.truncate(cut)


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """Records of `workdir/metrics.jsonl`, the last one kept per (split, step).

  A torn last line (a kill mid-write) is skipped with a warning.

  Raises:
    ValueError: a line before the last is not a JSON record (naming the file and line).
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  by_key = {}
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  # Every complete line ends with a newline, so the last element is '' or a torn line.
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      by_key[(record.get('split'), record['step'])] = record
    except (ValueError, KeyError, TypeError) as e:
      if number == len(lines):
        log.warning('%s: skipped a torn last line (%d bytes, left by a process killed '
                        'while writing it)', path, len(line))
        continue
      raise ValueError(f'{path}:{number}: not a metric record ({e}); expected one JSON object '
                       'with a "step" per line') from None
  records = sorted(by_key.values(), key=lambda r: (r['step'], r.get('split') or ''))
  return [r for r in records if split is None or r.get('split') == split]


class Progress:
  """A progress bar over steps that shows tokens/s, MFU and the latest metrics."""

  def __init__(self, total_steps: int, start_step: int, tokens_per_step: int, *,
               enabled: bool = True):
    self._tokens_per_step = tokens_per_step
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                          dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                          disable=not enabled)
    self._last_time = time.perf_counter()
    self._last_step = start_step

  def update(self, step: int, metrics: dict | None = None) -> float:
    """Moves the bar to `step`; returns tokens/s since the last update."""
    now = time.perf_counter()
    steps = step - self._last_step
    rate = steps * self._tokens_per_step / max(now - self._last_time, 1e-9)
    self._bar.update(steps)
    self._last_time, self._last_step = now, step
    return rate

  def show(self, metrics: dict) -> None:
    """Shows tokens/s, MFU and a few metrics of a record beside the bar."""
    postfix = {}
    if 'tokens_per_second' in metrics:
      postfix['tok/s'] = f"{metrics['tokens_per_second']:,.0f}"
    if 'mfu' in metrics:
      postfix['MFU'] = f"{100 * metrics['mfu']:.3g}%"
    for name in ('loss', 'fvu', 'l0', 'dead_fraction'):
      if name in metrics:
        postfix[name] = f'{metrics[name]:.4g}'
    self._bar.set_postfix(postfix, refresh=False)

  def close(self) -> None:
    self._bar.close()
