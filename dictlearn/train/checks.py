"""Checks before a training run does any work: the config, the store, the workdir, a resume.

    validate_config(config)          every field the trainer reads, named when wrong
    prepare_workdir(workdir)         a workdir that is a file is an error
    WorkdirLock(workdir)             one trainer per workdir (released when it dies)
    check_resume_config(saved, ...)  a resume may change how long it runs and what it
                                     records; a change of the run itself is refused
    check_store_fits(config, reader) the store has the rows the config asks for

Every error names the field (or file), the value found and what was expected, so
that `dictlearn.cli` can show it on one line.
"""
import fcntl
import json
import math
import os
import socket
import time

import jax
import ml_collections

from dictlearn import logs
from dictlearn.data import store as store_lib
from dictlearn.sae import ARCHITECTURES
from dictlearn.sae import make_sae
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import schedules


def _expect(ok: bool, field: str, value, expected: str) -> None:
  if not ok:
    raise ValueError(f'config.{field}={value!r}: expected {expected}')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field the trainer reads, before anything is read or written.

  Raises:
    ValueError: naming the field, its value and what is expected.
  """
  d, t, o, s = config.data, config.train, config.optim, config.sae
  positive = 'an integer >= 1'
  for field, value in (('train.batch_size', t.batch_size), ('train.num_steps', t.num_steps),
                       ('train.log_every', t.log_every),
                       ('train.checkpoint_every', t.checkpoint_every),
                       ('train.keep_checkpoints', t.keep_checkpoints),
                       ('data.shuffle_window_chunks', d.shuffle_window_chunks),
                       ('data.prefetch', d.prefetch), ('sae.n_latents', s.n_latents),
                       ('sae.b_dec_init_rows', s.b_dec_init_rows)):
    _expect(isinstance(value, int) and value >= 1, field, value, positive)
  for field, value in (('train.eval_batches', t.eval_batches),
                       ('train.ce_contexts', t.ce_contexts),
                       ('data.heldout_tokens', d.heldout_tokens),
                       ('optim.warmup_steps', o.warmup_steps), ('sae.aux_k', s.aux_k)):
    _expect(isinstance(value, int) and value >= 0, field, value, 'an integer >= 0')
  _expect(d.d_model == -1 or d.d_model >= 1, 'data.d_model', d.d_model,
          '-1 (the store\'s) or a width >= 1')
  _expect(s.architecture in ARCHITECTURES, 'sae.architecture', s.architecture,
          f'one of {sorted(ARCHITECTURES)}')
  if s.architecture in ('topk', 'batchtopk'):
    _expect(1 <= s.k <= s.n_latents, 'sae.k', s.k, f'1 <= k <= sae.n_latents={s.n_latents}')
  _expect(s.dead_tokens_threshold >= 1, 'sae.dead_tokens_threshold', s.dead_tokens_threshold,
          'a token count >= 1')
  _expect(0 < s.dense_threshold <= 1, 'sae.dense_threshold', s.dense_threshold,
          'a fraction in (0, 1]')
  _expect(s.sparsity_coefficient >= 0, 'sae.sparsity_coefficient', s.sparsity_coefficient,
          'a number >= 0')
  _expect(0 <= s.sparsity_warmup_fraction <= 1, 'sae.sparsity_warmup_fraction',
          s.sparsity_warmup_fraction, 'a fraction in [0, 1]')
  _expect(o.learning_rate > 0 and math.isfinite(o.learning_rate), 'optim.learning_rate',
          o.learning_rate, 'a finite number > 0')
  _expect(o.decay in schedules.DECAYS, 'optim.decay', o.decay, f'one of {schedules.DECAYS}')
  for field in ('decay_start_fraction', 'final_lr_fraction'):
    _expect(0 <= o[field] <= 1, f'optim.{field}', o[field], 'a fraction in [0, 1]')
  for field in ('b1', 'b2'):
    _expect(0 <= o[field] < 1, f'optim.{field}', o[field], 'a number in [0, 1)')
  _expect(o.eps > 0, 'optim.eps', o.eps, 'a number > 0')
  _expect(o.grad_clip_norm >= 0, 'optim.grad_clip_norm', o.grad_clip_norm, '>= 0 (0: no clip)')
  if not d.store:
    syn = d.synthetic
    for field in ('n_true', 'd_model', 'n_tokens'):
      _expect(isinstance(syn[field], int) and syn[field] >= 1, f'data.synthetic.{field}',
              syn[field], positive)
    _expect(syn.mean_active > 0, 'data.synthetic.mean_active', syn.mean_active, 'a number > 0')
    _expect(syn.noise_std >= 0, 'data.synthetic.noise_std', syn.noise_std, 'a number >= 0')
    _expect(0 < syn.recovered_cosine <= 1, 'data.synthetic.recovered_cosine',
            syn.recovered_cosine, 'a cosine in (0, 1]')
  width = d.d_model if d.d_model > 0 else (None if d.store else d.synthetic.d_model)
  if width is not None:
    make_sae(s, width)  # the architecture's own checks (capacity, dtypes, ...), no arrays


def check_store_fits(config: ml_collections.ConfigDict, reader: store_lib.StoreReader) -> None:
  """The store holds what the config asks of it: training rows for a batch, and the
  held-out rows of the final evaluation.

  Raises:
    ValueError: naming the store, its rows and the fields that ask for more.
  """
  rows, heldout = reader.n_rows, config.data.heldout_tokens
  batch, evals = config.train.batch_size, config.train.eval_batches
  if rows == 0:
    raise ValueError(f'store at {reader.path} has no rows; harvest into it first (or point '
                     'data.store at another store)')
  if rows - heldout < batch:
    raise ValueError(
        f'store at {reader.path} has {rows} rows; data.heldout_tokens={heldout} leaves '
        f'{rows - heldout} for training, fewer than one train.batch_size={batch}: lower '
        'heldout_tokens or the batch size, or use a larger store')
  if evals * batch > heldout:
    raise ValueError(
        f'train.eval_batches={evals} held-out batches of train.batch_size={batch} need '
        f'{evals * batch} rows, but data.heldout_tokens={heldout} holds out only {heldout} of '
        f'store {reader.path}: set eval_batches <= {heldout // batch} or raise heldout_tokens')


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir; one that is a file is an error."""
  if '://' in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f'workdir {workdir} is a file; expected a directory (a new one '
                             'for a new run, or a run\'s directory to resume it)')
  os.makedirs(workdir, exist_ok=True)


# Config fields a resumed run may change: how long it runs, what it records, how it
# is laid out on the devices, and its learning rate (what the error of a diverged run
# tells the user to lower before running the same command again). Any other change
# would make it another run.
RESUMABLE_FIELDS = ('train.num_steps', 'train.log_every', 'train.checkpoint_every',
                    'train.keep_checkpoints', 'train.eval_batches', 'train.ce_contexts',
                    'train.init_from', 'data.prefetch', 'mesh.shape', 'mesh.axis_names',
                    'mesh.logical_axis_rules', 'optim.learning_rate')


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def check_resume_config(saved: dict, config: ml_collections.ConfigDict, *, workdir: str,
                        step: int, run_info: dict) -> None:
  """Compares the config of a resume with the one its checkpoint was saved with.

  Changes of RESUMABLE_FIELDS are taken, each with a line on the console; a field
  that did not exist when the checkpoint was saved takes its value. Any other change
  (the store, the batch, the architecture or its sizes, the seed, ...) is refused.

  Raises:
    ValueError: naming each refused field with both values.
  """
  old = _flatten(json.loads(json.dumps(saved)))
  new = _flatten(json.loads(json.dumps(config.to_dict())))
  refused = []
  for field in sorted(set(old) | set(new)):
    if field not in new or old.get(field) == new[field]:
      continue
    if field.startswith('harvest.'):  # a pipeline's: the harvest checks it (harvest.json)
      continue
    before, after = old.get(field, '(absent)'), new[field]
    if field not in old or field in RESUMABLE_FIELDS:
      logs.stage('resuming from step %d with %s changed: %r -> %r', step, field, before, after)
    elif field == 'data.store' and after and _same_store(after, run_info, workdir):
      continue  # the same store, reached by another path (a moved run directory)
    elif field == 'data.d_model' and after in (-1, run_info['d_model']):
      continue
    else:
      refused.append(f'{field}: the checkpoint has {before!r}, the command line {after!r}')
  if refused:
    raise ValueError(
        f'the run in {workdir} (checkpoint step {step}) was started with another config: '
        + '; '.join(refused) + '. These would change the run: resume with the checkpoint\'s '
        'values, or start a new run from this checkpoint in a new workdir with '
        f'--config.train.init_from={ckpt_lib.checkpoint_dir(workdir)}')


def _same_store(path: str, run_info: dict, workdir: str) -> bool:
  try:
    recorded = ckpt_lib.recorded_store(run_info, workdir)
  except FileNotFoundError:
    return False
  if '://' in path or '://' in recorded:
    return path.rstrip('/') == recorded.rstrip('/')
  return os.path.realpath(path) == os.path.realpath(recorded)


class WorkdirBusyError(OSError):
  """Another trainer holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on a run's workdir while a trainer works in it.

  `fcntl.flock` on `workdir/lock`: the kernel releases it when the process ends,
  however it ends (SIGKILL included), so a stale lock never blocks a resume. The file
  records who holds it (pid, host, since), for the message the next trainer gets.
  Process 0 alone takes it: the processes of one multi-host run share the workdir.
  Workdirs on cloud storage (gs://) are not locked.
  """

  FILE = 'lock'

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, self.FILE)
    self._fd = None

  def __enter__(self):
    if '://' in self.path or jax.process_index() != 0:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 4096, 0).decode('utf-8', 'replace')
      os.close(fd)
      try:
        info = json.loads(holder)
        who = f"pid {info['pid']} on host {info['host']}, since {info['since']}"
      except (ValueError, KeyError, TypeError):
        who = 'a process that has not yet recorded itself'
      raise WorkdirBusyError(
          f'workdir {os.path.dirname(self.path)} is in use by another trainer ({who}); wait for '
          'it to finish or stop it, or train in another --workdir') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                              'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
