"""Metric records: JSONL and TensorBoard event files in the workdir, and a progress bar.

A training record holds the step's metrics and the throughput: tokens_per_second,
flops_per_token and mfu (`dictlearn.train.throughput`), data_wait_fraction. In a
multi-process run only process 0 writes (`MetricWriter(enabled=...)`).
"""
import json
import math
import os
import sys
import time

import numpy as np
import tqdm
from tensorboardX import SummaryWriter


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
    self._file = open(self.path, 'a', encoding='utf-8')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard')) if tensorboard else None

  def write(self, step: int, metrics: dict, prefix: str = 'train') -> None:
    if self._file is None:
      return
    record = {'step': int(step), 'split': prefix, **metrics}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(f'{prefix}/{name}', value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """Records of `workdir/metrics.jsonl`, the last one kept per (split, step)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  by_key = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_key[(record.get('split'), record['step'])] = record
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
