"""Two real processes on localhost, one run: JAX's multi-controller runtime on the CPU.

Each process has 4 fake CPU devices and the (2, 4) mesh spans both (collectives
through gloo; tests/multiprocess_worker.py). One start of the pair serves every
check, because starting processes is what costs: training equals one process
with 8 devices (losses to 1e-5, final parameters), stop and resume on 2 processes
is bitwise, a 2-process checkpoint restores and resumes in 1 process, a 2-process
harvest equals a 1-process one, and when one process is killed the other stops
with JAX's error within a bounded time instead of hanging.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dictlearn import harvest as harvest_lib
from dictlearn.data import corpus as corpus_lib
from dictlearn.data import store as store_lib
from dictlearn.harvest import parallel
from dictlearn.lm import gguf
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import metrics as metrics_lib
from dictlearn.train.trainer import train_and_evaluate
from experiments import harvest_smollm2
import multiprocess_worker  # tests/multiprocess_worker.py
from test_train import tiny_config
import tiny_lm  # tests/tiny_lm.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'multiprocess_worker.py')
HEARTBEAT_S = 10  # the workers' distributed.heartbeat_timeout_s
STARTUP_S = 600  # generous: the imports alone take seconds per process on a busy machine


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def final_state(workdir):
  return ckpt_lib.restore_arrays(ckpt_lib.checkpoint_dir(str(workdir)))[1]


def losses(workdir):
  return np.array([r['loss'] for r in metrics_lib.read_metrics(str(workdir), 'train')])


def leaves(state):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(state)}


def _wait_for(predicate, procs, timeout, what):
  deadline = time.time() + timeout
  while not predicate():
    for p in procs:
      if p.poll() is not None:
        raise AssertionError(f'a worker exited ({p.returncode}) before {what}:\n'
                             + _tail(p.stderr_path))
    if time.time() > deadline:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.5)


def _tail(path, n=4000):
  with open(path, encoding='utf-8', errors='replace') as f:
    text = ''.join(line for line in f if '[Gloo]' not in line)
  return text[-n:]


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  """Starts the pair and leaves it in its endless run; yields (out dir, processes)."""
  out = tmp_path_factory.mktemp('mp')
  tiny_lm.write_tiny_gguf(out / 'tiny.gguf', np.random.default_rng(0))
  port = free_port()
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  procs = []
  for p in range(2):
    err = out / f'worker.{p}.err'
    proc = subprocess.Popen(
        [sys.executable, WORKER, '--process', str(p), '--processes', '2', '--port', str(port),
         '--dir', str(out), '--heartbeat', str(HEARTBEAT_S)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(err, 'w', encoding='utf-8'))
    proc.stderr_path = err
    procs.append(proc)
  try:
    yield out, procs
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()


@pytest.fixture(scope='module')
def scenarios_done(two_processes):
  out, procs = two_processes
  _wait_for(lambda: all((out / f'done.{p}.json').exists() for p in range(2)), procs,
            STARTUP_S, 'the scenarios to finish')
  return out


@pytest.mark.slow
def test_two_processes_train_like_one_with_eight_devices(two_processes, scenarios_done, tmp_path):
  out = scenarios_done
  # The reference: this process, 8 fake devices, the same (2, 4) mesh.
  train_and_evaluate(tiny_config(**multiprocess_worker.TRAIN),
                     str(tmp_path / 'one'))
  one, two = losses(tmp_path / 'one'), losses(out / 'full')
  assert len(one) == len(two) == 20
  np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)
  # The 2-process checkpoint, restored here in one process.
  reference, restored = leaves(final_state(tmp_path / 'one')), leaves(final_state(out / 'full'))
  assert reference.keys() == restored.keys()
  for name, x in reference.items():
    np.testing.assert_allclose(restored[name], x, rtol=1e-5, atol=1e-5, err_msg=name)
  # Held-out evaluation, sharded over both processes, written once (by process 0).
  evals = [r for r in metrics_lib.read_metrics(str(out / 'full'), 'eval')]
  assert len(evals) == 1
  assert evals[0]['fvu'] == pytest.approx(
      metrics_lib.read_metrics(str(tmp_path / 'one'), 'eval')[0]['fvu'], rel=1e-5, abs=1e-6)
  record = metrics_lib.read_metrics(str(out / 'full'), 'train')[-1]
  assert record['tokens_per_second'] > 0 and 0 < record['mfu'] < 1
  assert record['flops_per_token'] == 2 * 16 * 128 + 8 * 16 * 4  # topk: sparse count
  assert not (out / 'full' / 'log.1.txt').exists() and (out / 'log.1.txt').exists()


@pytest.mark.slow
def test_bad_meshes_and_batches_are_refused_naming_both_values(scenarios_done):
  for p in range(2):
    refused = json.loads((scenarios_done / f'refused.{p}.json').read_text())
    assert 'needs 16 devices; 8 are available (2 processes with 4 devices each)' in (
        refused['mesh_too_big'])
    assert 'uses 4 of the 8 devices of 2 processes' in refused['mesh_partial']
    assert 'train.batch_size=63' in refused['batch'] and 'process count 2' in refused['batch']
    for name in ('mesh_too_big', 'mesh_partial', 'batch'):
      assert refused[f'{name} wrote'] == [], (name, refused[f'{name} wrote'])


@pytest.mark.slow
def test_two_processes_stop_and_resume_bitwise(scenarios_done):
  out = scenarios_done
  straight, resumed = leaves(final_state(out / 'full')), leaves(final_state(out / 'resumed'))
  assert int(straight["['step']"]) == int(resumed["['step']"]) == 20
  for name, x in straight.items():
    np.testing.assert_array_equal(resumed[name], x, err_msg=name)
  # restore_arrays in the two processes: sharded over all 8 devices, not gathered.
  for p in range(2):
    info = json.loads((out / f'restore.{p}.json').read_text())
    assert info == {'step': 20, 'devices': 8, 'addressable': 4, 'spec': info['spec']}


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(scenarios_done, tmp_path):
  out = scenarios_done
  import shutil  # pylint: disable=import-outside-toplevel
  stopped = tmp_path / 'stopped'
  shutil.copytree(out / 'stopped', stopped)
  too_big = tiny_config(**dict(multiprocess_worker.TRAIN,
                                                   **{'mesh.shape': (4, 4)}))
  with pytest.raises(ValueError, match=r"needs 16 devices; 8 are available; the checkpoint at "
                     r"step 10 .* was written on mesh \{'data': 2, 'model': 4\}"):
    train_and_evaluate(too_big, str(stopped))
  one = tiny_config(**dict(multiprocess_worker.TRAIN, **{'mesh.shape': (8, 1)}))
  summary = train_and_evaluate(one, str(stopped))
  assert summary['step'] == 20
  reference = leaves(final_state(out / 'full'))
  for name, x in leaves(final_state(stopped)).items():
    np.testing.assert_allclose(x, reference[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_two_process_harvest_equals_one_process(scenarios_done, tmp_path):
  out = scenarios_done
  config = harvest_smollm2.get_config('tiny')
  with config.unlocked():
    config.model = str(out / 'tiny.gguf')
    config.sites = ('blocks.0.hook_resid_post', 'blocks.1.hook_resid_post')
  one = harvest_lib.harvest(config, tmp_path / 'one', model=gguf.load_gguf(config.model))
  two = json.loads((out / 'harvest' / 'harvest.json').read_text())
  assert two['complete'] and two['processes'] == 2
  for key in ('n_tokens', 'n_contexts', 'documents', 'corpus_exhausted'):
    assert two['summary'][key] == one[key], key
  for site in config.sites:
    a, b = (store_lib.StoreReader(f'{d}/{site}') for d in (tmp_path / 'one', out / 'harvest'))
    assert a.n_rows == b.n_rows == 2000
    for read in ('read_tokens', 'read_doc', 'read_pos'):
      np.testing.assert_array_equal(getattr(b, read)(0, 2000), getattr(a, read)(0, 2000))
    np.testing.assert_allclose(b.read_rows(0, 2000), a.read_rows(0, 2000), rtol=1e-5, atol=1e-5)
    sa, sb = a.manifest['statistics'], b.manifest['statistics']
    assert sb['count'] == sa['count']
    assert sb['mean_sq_norm'] == pytest.approx(sa['mean_sq_norm'], rel=1e-6)
    assert not [k for k in os.listdir(out / 'harvest' / site) if k.startswith('progress')]


@pytest.mark.slow
def test_killed_process_stops_the_other_within_the_heartbeat(two_processes, scenarios_done):
  out, procs = two_processes
  long_metrics = out / 'long' / 'metrics.jsonl'
  _wait_for(lambda: long_metrics.exists() and long_metrics.stat().st_size > 0, procs, STARTUP_S,
            'the endless run to start')
  procs[1].send_signal(signal.SIGKILL)
  start = time.time()
  try:
    procs[0].wait(timeout=HEARTBEAT_S + 60)
  except subprocess.TimeoutExpired:
    pytest.fail(f'process 0 still runs {HEARTBEAT_S + 60} s after process 1 was killed')
  took = time.time() - start
  assert procs[0].returncode != 0
  err = _tail(procs[0].stderr_path, 20000)
  assert 'Task 1 heartbeat timeout' in err or 'another task died' in err, err[-3000:]
  assert took < HEARTBEAT_S + 60, took


def test_unreachable_coordinator_is_one_line_and_writes_nothing(tmp_path):
  port = free_port()  # nothing listens there
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run(
      [sys.executable, '-m', 'dictlearn.train', '--config',
       os.path.join(REPO, 'experiments', 'tiny.py'), '--workdir', str(tmp_path / 'w'),
       f'--config.distributed.coordinator_address=localhost:{port}',
       '--config.distributed.num_processes=2', '--config.distributed.process_id=1',
       '--config.distributed.initialization_timeout_s=2'],
      env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f'error: could not reach the coordinator at localhost:{port} as process 1 of 2 within '
      'distributed.initialization_timeout_s=2 s'), lines
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('fields,message', [
    ({'initialize': 'sometimes'}, "expected one of ('auto', 'always', 'never')"),
    ({'num_processes': 2, 'process_id': 2}, 'process_id=2 is not a process of num_processes=2'),
    ({'num_processes': 2}, "sets ['num_processes'] but not ['coordinator_address', 'process_id']"),
    ({'heartbeat_timeout_s': 0}, 'heartbeat_timeout_s=0: expected at least 1 second'),
])
def test_bad_distributed_sections_are_named(fields, message, monkeypatch):
  from dictlearn import distributed  # pylint: disable=import-outside-toplevel
  from experiments import base  # pylint: disable=import-outside-toplevel
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  config = base.distributed_config()
  config.update(fields)
  with pytest.raises(ValueError, match=re.escape(message)):
    distributed.check_config(config)
  assert not distributed.wanted(base.distributed_config())  # one process by default


def test_block_harvest_resumes_after_a_kill_and_equals_one_process(tmp_path, monkeypatch):
  """The two processes' halves of a harvest, run here one after the other (they need
  no collective), process 1 killed after its third forward pass and rerun."""
  tiny_lm.write_tiny_gguf(tmp_path / 'tiny.gguf', np.random.default_rng(0))
  config = harvest_smollm2.get_config('tiny')
  with config.unlocked():
    config.model = str(tmp_path / 'tiny.gguf')
  model = gguf.load_gguf(config.model)
  harvest_lib.harvest(config, tmp_path / 'one', model=model)
  out, sites = tmp_path / 'two', tuple(config.sites)
  for site in sites:
    store_lib.create_block_store(
        f'{out}/{site}', model[0].d_model, config.store_dtype, chunk_rows=config.store_chunk_rows,
        shard_chunks=config.store_shard_chunks, metadata={'model': 'tiny', 'site': site},
        n_processes=2)
  writers = lambda p: {s: store_lib.BlockWriter(f'{out}/{s}', process=p, n_processes=2)
                       for s in sites}
  corpus = lambda: corpus_lib.Corpus(config.corpus)
  forward, calls = parallel.llama.forward, []

  def dies_on_the_fourth(*args, **kwargs):
    calls.append(1)
    if len(calls) > 3:
      raise KeyboardInterrupt
    return forward(*args, **kwargs)

  monkeypatch.setattr(parallel.llama, 'forward', dies_on_the_fourth)
  with pytest.raises(KeyboardInterrupt):
    parallel.run(config, str(out), corpus(), model, writers(1))
  monkeypatch.setattr(parallel.llama, 'forward', forward)
  killed = writers(1)[sites[0]]
  assert killed.committed_blocks > 0 and killed.resume_note['rows'] > 0
  parallel.run(config, str(out), corpus(), model, writers(1))  # resumes at its note
  n_tokens, _, _, _, _ = parallel.run(config, str(out), corpus(), model, writers(0))
  with pytest.raises(ValueError, match='is being filled by 2 processes; reopened by 3'):
    store_lib.BlockWriter(f'{out}/{sites[0]}', process=0, n_processes=3)
  for site in sites:
    store_lib.finish_block_store(f'{out}/{site}', n_tokens)
    a, b = (store_lib.StoreReader(f'{d}/{site}') for d in (tmp_path / 'one', out))
    assert a.n_rows == b.n_rows == n_tokens == 2000
    for read in ('read_tokens', 'read_doc', 'read_pos'):
      np.testing.assert_array_equal(getattr(b, read)(0, 2000), getattr(a, read)(0, 2000))
    np.testing.assert_allclose(b.read_rows(0, 2000), a.read_rows(0, 2000), rtol=1e-5, atol=1e-5)
    assert b.manifest['statistics']['count'] == 2000
