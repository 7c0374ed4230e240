"""Faults and bad input, injected for real: damaged stores and checkpoints, a full disk,
two trainers on one workdir, a torn metrics line, and every user error on one line.

No mocks: files are cut, deleted and flipped on disk, the disk fills for real (a small
tmpfs when this runs as root, else a child process under RLIMIT_FSIZE), processes are
real and are killed with real signals.
"""
import contextlib
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
import tensorstore as ts

from dictlearn import cli
from dictlearn.data import loader as loader_lib
from dictlearn.data import store as store_lib
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import checks
from dictlearn.train import metrics as metrics_lib
from dictlearn.train import trainer
from test_train import tiny_config  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {'model': 'test', 'site': 'test'}
ONE_DEVICE = {'mesh.shape': (1, 1), 'train.eval_batches': 0}


def leaves(state):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(state)}


def assert_same_state(a, b):
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def one_error_line(capsys, fn, expect_status=1):
  """Runs `fn` the way every entry point does (dictlearn.cli); returns its one line."""
  status = cli._run(fn, None, verbose=False)  # pylint: disable=protected-access
  lines = capsys.readouterr().err.strip().splitlines()
  assert status == expect_status and len(lines) == 1 and lines[0].startswith('error: '), lines
  assert 'internal error' not in lines[0], lines
  return lines[0]


@pytest.fixture(autouse=True)
def _restore_log_handlers():
  """The tools run in-process install console handlers on pytest's captured stderr,
  which closes after the test: take them off again."""
  root = logging.getLogger()
  before = list(root.handlers)
  yield
  for handler in root.handlers[:]:
    if handler not in before:
      root.removeHandler(handler)


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
  """A tiny run on one device with checkpoints at steps 10 and 20; kept pristine."""
  workdir = str(tmp_path_factory.mktemp('faults') / 'base')
  trainer.train_and_evaluate(tiny_config(**ONE_DEVICE), workdir)
  return workdir


def copy_run(base_run, tmp_path, name='run'):
  target = str(tmp_path / name)
  shutil.copytree(base_run, target)
  return target


# ---------------------------------------------------------------------------
# Stores: a missing or changed chunk, NaN rows
# ---------------------------------------------------------------------------

def small_store(path, rows=512, chunk_rows=64):
  x = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
  x[128:192] = 0  # a chunk of zeros is stored too (writer version 2)
  writer = store_lib.StoreWriter(path, 8, chunk_rows=chunk_rows, shard_chunks=1, metadata=META)
  writer.append(x, doc=np.zeros(rows, np.int32))  # an int chunk of zeros, also stored
  writer.finish()
  return x


def test_missing_or_changed_chunk_is_an_error_naming_store_and_rows(tmp_path, capsys):
  path = str(tmp_path / 'store')
  x = small_store(path)
  reader = store_lib.StoreReader(path)
  np.testing.assert_array_equal(reader.read_rows(0, 512), x)
  assert reader.missing_shard_files() == [] and store_lib.verify_store(path)['ok']

  os.remove(os.path.join(path, 'activations', 'c', '1', '0'))  # rows [64, 128)
  with pytest.raises(store_lib.StoreReadError, match=rf'store at {path}: activations rows '
                                                     r'\[0, 512\) cannot be read: NOT_FOUND'):
    reader.read_rows(0, 512)
  assert reader.read_rows(0, 64).shape == (64, 8)  # the chunks that are there still read
  # The loader, reading ahead on its own thread, raises the store's own error.
  with loader_lib.Loader(reader, batch_size=512, seed=0, shuffle_window_chunks=8,
                         heldout_tokens=0, scale=1.0, sharding=None, prefetch=1) as loader:
    with pytest.raises(store_lib.StoreReadError, match='cannot be read'):
      next(loader)
  # A flipped byte fails the chunk's crc32c.
  shard = os.path.join(path, 'activations', 'c', '2', '0')
  data = bytearray(open(shard, 'rb').read())
  data[100] ^= 0x10
  open(shard, 'wb').write(bytes(data))
  with pytest.raises(store_lib.StoreReadError, match=r'rows \[128, 192\) cannot be read'):
    reader.read_rows(128, 192)

  inspect_store = _load_tool('inspect_store')
  assert inspect_store.main([path]) == 0
  out = capsys.readouterr().out
  assert 'DAMAGED: shard files missing: activations/c/1/0 (rows [64, 128))' in out
  assert inspect_store.main([path, '--verify']) == 1
  captured = capsys.readouterr()
  assert 'bad chunk activations rows [64, 128): NOT_FOUND' in captured.out
  assert 'bad chunk activations rows [128, 192)' in captured.out
  assert captured.err.strip().splitlines()[-1] == (
      f'error: store at {path} failed verification: 2 bad chunk(s)')


def _load_tool(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'tools', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_nan_rows_in_a_store_are_named(tmp_path):
  path = str(tmp_path / 'store')
  small_store(path)
  # Written elsewhere: dictlearn's own writer refuses NaN rows, so write around it.
  array = ts.open({'driver': 'zarr3', 'kvstore': store_lib.kvstore_spec(path + '/activations')},
                  open=True).result()
  array[300:302].write(np.full((2, 8), np.nan, np.float32)).result()
  reader = store_lib.StoreReader(path)
  with pytest.raises(store_lib.NonFiniteRowsError, match=r'2 row\(s\) hold NaN or Inf: rows '
                                                         r'300, 301 \(of rows \[256, 320\)\)'):
    reader.read_indices(np.array([5, 301]))
  report = store_lib.verify_store(path)
  assert report['nonfinite_rows'] == [300, 301] and not report['ok']


# ---------------------------------------------------------------------------
# A damaged newest checkpoint: fall back, warn once, keep it aside
# ---------------------------------------------------------------------------

def damage(step_dir, kind):
  if kind == 'truncated data file':  # each of them: which ones hold live data varies
    for path in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True):
      os.truncate(path, os.path.getsize(path) // 2)
  elif kind == 'deleted manifest.ocdbt':
    os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))
  elif kind == 'truncated _METADATA':
    os.truncate(os.path.join(step_dir, 'state', '_METADATA'), 100)
  elif kind == 'empty step directory':
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  elif kind == 'flipped bytes':
    flip_a_bit_no_storage_layer_notices(step_dir)


def flip_a_bit_no_storage_layer_notices(step_dir):
  """Flips one bit of the file holding the arrays' chunks where orbax and TensorStore
  read the changed values without an error, so that only the recorded checksums can
  catch it (the OCDBT index and small values inlined in it carry checksums of their
  own, DATA_LOSS). The chunks are zstd-compressed: a flipped bit may break the stream,
  which zstd reports, or decode to other values. Which array lies where in the file
  varies with the order of the asynchronous writes, so the bit is searched for."""
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*'))
  path = max(files, key=os.path.getsize)
  original = open(path, 'rb').read()
  checkpoints, step = os.path.dirname(step_dir), int(os.path.basename(step_dir))
  for i in range(64):
    data = bytearray(original)
    data[(len(data) // 2 + 97 * i) % len(data)] ^= 0x04
    open(path, 'wb').write(bytes(data))
    try:
      ckpt_lib.restore_arrays(checkpoints, step)
    except ckpt_lib.CorruptCheckpointError:
      return  # read without complaint, and the values differ from the saved ones
    except ValueError:
      pass  # a storage layer noticed this one (TensorStore's error: zstd, OCDBT's checksums)
  raise AssertionError(f'no bit of {path} flipped unnoticed by the storage layers in 64 tries')


REASONS = {'truncated data file': 'OUT_OF_RANGE', 'deleted manifest.ocdbt': 'NOT_FOUND',
           'truncated _METADATA': 'JSONDecodeError', 'empty step directory': 'is empty',
           'flipped bytes': 'fail their checksums'}


@pytest.mark.parametrize('kind', sorted(REASONS))
def test_damaged_newest_checkpoint_falls_back_with_one_warning(base_run, tmp_path, caplog, kind):
  workdir = copy_run(base_run, tmp_path)
  damage(os.path.join(workdir, 'checkpoints', '20'), kind)
  config = tiny_config(**ONE_DEVICE)
  run = trainer.open_run(config, workdir)
  try:
    with caplog.at_level(logging.WARNING):
      state = trainer.initial_state(run, config)
  finally:
    run.manager.close()
  assert int(state['step']) == 10
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and r.name.startswith('dictlearn')]
  assert len(warnings) == 1, warnings
  assert f'checkpoint step 20 in {workdir}/checkpoints is damaged and was skipped' in warnings[0]
  assert REASONS[kind] in warnings[0] and 'resuming from step 10' in warnings[0]
  # Kept aside for inspection, out of the way of the next save of step 20.
  aside = glob.glob(os.path.join(workdir, ckpt_lib.DAMAGED_DIR, '20-*'))
  assert len(aside) == 1 and f'moved to {aside[0]}' in warnings[0]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10']
  if kind == 'flipped bytes':  # what the tools read goes through the same check
    inspect = os.path.join(workdir, 'inspect', 'checkpoints')
    shutil.copytree(aside[0], os.path.join(inspect, '20'))
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match='fail their checksums'):
      ckpt_lib.restore_arrays(inspect, 20)


def test_resume_after_fallback_is_bitwise_the_uninterrupted_run(base_run, tmp_path):
  workdir = copy_run(base_run, tmp_path)
  damage(os.path.join(workdir, 'checkpoints', '20'), 'flipped bytes')
  trainer.train_and_evaluate(tiny_config(**ONE_DEVICE), workdir)
  _, straight = ckpt_lib.restore_arrays(ckpt_lib.checkpoint_dir(base_run), 20)
  _, resumed = ckpt_lib.restore_arrays(ckpt_lib.checkpoint_dir(workdir), 20)
  assert_same_state(straight, resumed)


def test_no_checkpoint_restores_is_one_error_and_nothing_moves(base_run, tmp_path, capsys):
  workdir = copy_run(base_run, tmp_path)
  for step in ('10', '20'):
    damage(os.path.join(workdir, 'checkpoints', step), 'truncated _METADATA')
  line = one_error_line(capsys, lambda: trainer.train_and_evaluate(
      tiny_config(**ONE_DEVICE), workdir))
  assert 'restores: step 20: JSONDecodeError' in line and 'step 10: JSONDecodeError' in line
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']


# ---------------------------------------------------------------------------
# Resuming with another config
# ---------------------------------------------------------------------------

def test_resume_config_changes_taken_or_refused_by_name(base_run, tmp_path, caplog, capsys):
  saved = tiny_config().to_dict()
  run_info = {'store': os.path.join(base_run, 'data'), 'store_from_workdir': 'data',
              'd_model': 16, 'data_scale': 1.0}
  changed = tiny_config(**{'train.num_steps': 40, 'train.log_every': 2,
                           'train.eval_batches': 1, 'mesh.shape': (2, 1)})
  with caplog.at_level(logging.INFO):
    checks.check_resume_config(saved, changed, workdir=base_run, step=20, run_info=run_info)
  lines = [r.getMessage() for r in caplog.records if r.name == 'dictlearn.stage']
  assert 'resuming from step 20 with train.num_steps changed: 20 -> 40' in lines
  assert len(lines) == 4, lines
  # A pipeline's harvest section is the harvest's to check (against harvest.json).
  checks.check_resume_config(dict(saved, harvest={'batch_size': 8}), ml_collections.ConfigDict(
      dict(saved, harvest={'batch_size': 4})), workdir=base_run, step=20, run_info=run_info)
  # The same store reached by another path is the same store.
  checks.check_resume_config(saved, tiny_config(**{'data.store': os.path.join(
      base_run, '..', 'base', 'data')}), workdir=base_run, step=20, run_info=run_info)

  workdir = copy_run(base_run, tmp_path)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  other_store = str(tmp_path / 'other')
  small_store(other_store)
  for overrides, message in [
      ({'data.store': other_store}, f"data.store: the checkpoint has '', the command line "
                                    f"'{other_store}'"),
      ({'train.batch_size': 32}, 'train.batch_size: the checkpoint has 64, the command line 32'),
      ({'sae.n_latents': 256}, 'sae.n_latents: the checkpoint has 128, the command line 256'),
      ({'seed': 1}, 'seed: the checkpoint has 0, the command line 1')]:
    line = one_error_line(capsys, lambda o=overrides: trainer.train_and_evaluate(
        tiny_config(**o), workdir))
    assert message in line and f'--config.train.init_from={workdir}/checkpoints' in line
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before
  # A new run from that checkpoint with another size: its arrays named, no orbax dump.
  line = one_error_line(capsys, lambda: trainer.train_and_evaluate(
      tiny_config(**{'sae.n_latents': 256, 'train.init_from': f'{workdir}/checkpoints'}),
      str(tmp_path / 'new')))
  assert 'params.W_dec: this SAE has float32[256, 16], the checkpoint float32[128, 16]' in line


# ---------------------------------------------------------------------------
# Two trainers on one workdir
# ---------------------------------------------------------------------------

def test_second_trainer_on_a_workdir_is_refused_until_the_first_dies(base_run, tmp_path):
  workdir = copy_run(base_run, tmp_path)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', PYTHONPATH=REPO)
  first = subprocess.Popen(
      [sys.executable, '-m', 'dictlearn.train', '--config', 'experiments/tiny.py', '--workdir',
       workdir, '--config.train.num_steps=100000', '--config.train.checkpoint_every=100000'],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  lock = os.path.join(workdir, checks.WorkdirLock.FILE)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(lock) and str(first.pid) in
                                          open(lock, encoding='utf-8').read()):
      assert first.poll() is None, first.communicate()[1].decode()[-2000:]
      time.sleep(0.1)
    with pytest.raises(checks.WorkdirBusyError,
                       match=rf'workdir {workdir} is in use by another trainer \(pid {first.pid} '
                             rf'on host {os.uname().nodename}, since '):
      trainer.train_and_evaluate(tiny_config(), workdir)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  with checks.WorkdirLock(workdir):  # the kernel released the dead process's lock
    assert str(os.getpid()) in open(lock, encoding='utf-8').read()


# ---------------------------------------------------------------------------
# A full disk while saving
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(path):
  """A 4 MiB tmpfs at `path` (as root); yields True, or False where mounting is not allowed."""
  os.makedirs(path)
  try:
    mount = ['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', path]
    mounted = os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0
  except OSError:
    mounted = False
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(['umount', '-l', path], check=False)


LIMIT_FILE_SIZE = """import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])"""


def test_disk_full_while_saving_is_one_error_and_resumable(base_run, tmp_path):
  """The second checkpoint does not fit: one error line, step 10 intact, and the same
  command resumes once there is space. A tmpfs that is full for real where this runs as
  root; elsewhere a trainer whose files may not grow past 32 KiB (RLIMIT_FSIZE, EFBIG)."""
  mount = str(tmp_path / 'disk')
  with small_disk(mount) as mounted:
    workdir = os.path.join(mount, 'run')
    os.makedirs(os.path.join(workdir, 'checkpoints'))
    shutil.copytree(os.path.join(base_run, 'checkpoints', '10'),
                    os.path.join(workdir, 'checkpoints', '10'))
    # The store stays where it is (the run records its absolute path too).
    shutil.copy(os.path.join(base_run, 'metrics.jsonl'), workdir)
    filler = os.path.join(mount, 'filler')
    args = ['-m', 'dictlearn.train', '--config', 'experiments/tiny.py', '--workdir', workdir,
            '--config.train.eval_batches=0', '--config.mesh.shape=(1,1)']
    if mounted:
      free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
      with open(filler, 'wb') as f:
        f.write(b'\0' * (free - 128 * 1024))  # room for the log and metrics, not a checkpoint
      limited = [sys.executable] + args
    else:  # writes past 32 KiB fail with EFBIG (SIGXFSZ ignored), set before exec
      limited = [sys.executable, '-c', LIMIT_FILE_SIZE, str(32 * 1024)] + args
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
               PYTHONPATH=REPO)
    full = subprocess.run(limited, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [l for l in full.stderr.splitlines() if l.strip() and '%|' not in l
             and not l.startswith('training a ') and not l.startswith('warning: cannot write')]
    assert full.returncode == 1, full.stderr[-3000:]
    assert len(lines) == 1, full.stderr[-3000:]
    reason = 'No space left on device' if mounted else 'File too large'
    assert lines[0].startswith(f'error: saving checkpoint step 20 in {workdir}/checkpoints '
                               f'failed: {reason}. The earlier checkpoints are intact (latest: '
                               'step 10): once the cause is fixed'), lines
    assert ckpt_lib.latest_step(os.path.join(workdir, 'checkpoints')) == 10
    if mounted:
      os.remove(filler)
    resumed = subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']  # no partial
    _, straight = ckpt_lib.restore_arrays(ckpt_lib.checkpoint_dir(base_run), 20)
    _, again = ckpt_lib.restore_arrays(os.path.join(workdir, 'checkpoints'), 20)
    assert_same_state(straight, again)


# ---------------------------------------------------------------------------
# A torn last line in metrics.jsonl
# ---------------------------------------------------------------------------

def test_torn_metrics_line_is_skipped_then_cut(base_run, tmp_path, caplog, capsys):
  workdir = copy_run(base_run, tmp_path)
  path = os.path.join(workdir, 'metrics.jsonl')
  records = metrics_lib.read_metrics(workdir)
  with open(path, 'a', encoding='utf-8') as f:
    f.write('{"step": 25, "split": "tr')  # a kill mid-write
  with caplog.at_level(logging.WARNING):
    assert metrics_lib.read_metrics(workdir) == records
  assert any('skipped a torn last line (25 bytes' in r.getMessage() for r in caplog.records)
  inspect_checkpoint = _load_tool('inspect_checkpoint')
  assert inspect_checkpoint.describe(workdir)['last_train_metrics'] == records[-1]
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False)  # a resumed run appends
  writer.write(30, {'loss': 1.0})
  writer.close()
  assert metrics_lib.read_metrics(workdir)[-1] == {'step': 30, 'split': 'train', 'loss': 1.0}
  lines = open(path, encoding='utf-8').read().splitlines()
  lines.insert(1, '{"broken')
  open(path, 'w', encoding='utf-8').write('\n'.join(lines) + '\n')
  line = one_error_line(capsys, lambda: metrics_lib.read_metrics(workdir))
  assert line.startswith(f'error: {path}:2: not a metric record')


# ---------------------------------------------------------------------------
# Every user error: one line, before any work
# ---------------------------------------------------------------------------

def test_user_errors_are_one_line_before_any_work(base_run, tmp_path, capsys):
  store = os.path.join(base_run, 'data')
  zero = str(tmp_path / 'zero')
  store_lib.StoreWriter(zero, 16, metadata=META).finish()
  holes = str(tmp_path / 'holes')
  shutil.copytree(store, holes)
  os.remove(os.path.join(holes, 'activations', 'c', '0', '0'))
  cases = [
      ({'train.batch_size': 0}, 'config.train.batch_size=0: expected an integer >= 1'),
      ({'train.batch_size': -4}, 'config.train.batch_size=-4: expected an integer >= 1'),
      ({'train.checkpoint_every': 0}, 'config.train.checkpoint_every=0: expected an integer'),
      ({'train.log_every': 0}, 'config.train.log_every=0: expected an integer >= 1'),
      ({'train.num_steps': 0}, 'config.train.num_steps=0: expected an integer >= 1'),
      ({'optim.learning_rate': float('nan')}, 'config.optim.learning_rate=nan: expected a '
                                              'finite number > 0'),
      ({'data.store': store, 'data.heldout_tokens': 100000},
       f'store at {store} has 16384 rows; data.heldout_tokens=100000 leaves -83616 for '
       'training, fewer than one train.batch_size=64'),
      ({'data.store': store, 'train.eval_batches': 100},
       'train.eval_batches=100 held-out batches of train.batch_size=64 need 6400 rows, but '
       'data.heldout_tokens=2048 holds out only 2048'),
      ({'data.store': zero}, f'store at {zero} has no rows'),
      ({'data.store': holes}, f'store at {holes}: activations rows [0, 16384) cannot be read'),
  ]
  for i, (overrides, message) in enumerate(cases):
    workdir = str(tmp_path / f'w{i}')
    line = one_error_line(capsys, lambda o=overrides, w=workdir: trainer.train_and_evaluate(
        tiny_config(**o), w))
    assert message in line, (overrides, line)
    checkpoints = os.path.join(workdir, 'checkpoints')
    assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints), overrides
  afile = tmp_path / 'afile'
  afile.write_text('x')
  line = one_error_line(capsys, lambda: trainer.train_and_evaluate(tiny_config(), str(afile)))
  assert 'is a file; expected a directory' in line


def test_harvest_config_is_checked_before_any_work(tmp_path, capsys):
  from dictlearn import harvest as harvest_lib  # pylint: disable=g-import-not-at-top
  from experiments import harvest_smollm2  # pylint: disable=g-import-not-at-top
  for overrides, message in [
      ({'batch_size': 0}, 'config.batch_size=0: expected an integer >= 1'),
      ({'token_budget': 0}, 'config.token_budget=0: expected an integer >= 1, or -1'),
      ({'store_shard_chunks': 0}, 'config.store_shard_chunks=0: expected an integer >= 1'),
      ({'sites': ()}, 'config.sites=(): expected a non-empty tuple of hook site names'),
      ({'corpus': str(tmp_path / 'nope.txt')}, "no such file or directory exists")]:
    config = harvest_smollm2.get_config('tiny')
    with config.unlocked():
      config.update(overrides)
    out = tmp_path / 'out'
    line = one_error_line(capsys, lambda c=config: harvest_lib.harvest(c, str(out)))
    assert message in line, line
    assert not out.exists()
