"""Entry points as a user runs them: from any directory, quiet, one line per error.

Also the portable run records: a workdir moved with its data still resumes and
evaluates, from another current directory.
"""
import argparse
import asyncio
import gc
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from dictlearn import cli
from dictlearn import logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'experiments', 'tiny.py')


def run(args, cwd, expect=0):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  env.pop('PYTHONPATH', None)
  env['PYTHONPATH'] = REPO  # this checkout's dictlearn, whatever is installed
  result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == expect, (result.returncode, result.stderr[-3000:])
  return result


def test_train_from_elsewhere_quiet_then_moved_workdir_resumes_and_evaluates(tmp_path):
  elsewhere = tmp_path / 'cwd'
  elsewhere.mkdir()
  first = run(['-m', 'dictlearn.train', '--config', TINY, '--workdir', 'run',
               '--config.train.num_steps=10', '--config.train.checkpoint_every=10'], elsewhere)
  console = first.stderr
  assert 'training a topk SAE of 128 latents' in console
  for noise in ('INFO', "Unable to initialize backend 'tpu'", 'absl', 'Traceback'):
    assert noise not in console, console
  assert 'step 10' in first.stdout and 'held-out FVU' in first.stdout
  log = (elsewhere / 'run' / 'log.txt').read_text()
  assert 'I absl' in log or 'I jax' in log  # the details went to the log file

  # Move the workdir (with its synthetic data inside) and work on it from another directory.
  moved = tmp_path / 'moved'
  shutil.move(str(elsewhere / 'run'), str(moved))
  shutil.rmtree(elsewhere)
  other = tmp_path / 'other'
  other.mkdir()
  evaluation = json.loads(run(['-m', 'dictlearn.evals', '--workdir', str(moved)], other).stdout)
  assert evaluation['step'] == 10 and 0 < evaluation['fvu'] < 1
  resumed = run(['-m', 'dictlearn.train', '--config', TINY, '--workdir', str(moved),
                 '--config.train.num_steps=20'], other)
  assert 'from step 10 to 20' in resumed.stderr and 'step 20' in resumed.stdout
  records = [json.loads(line) for line in (moved / 'metrics.jsonl').read_text().splitlines()]
  assert any(r['split'] == 'eval' and r['step'] == 10 and 'fvu' in r for r in records)


@pytest.mark.parametrize('args,expect,message', [
    (['--config.sae.kk=3'], 2, "config.sae has no field 'kk'"),
    (['--bogus=1'], 2, 'Unknown command line flag'),
    ([], 1, 'is a file; expected a directory'),
])
def test_bad_command_lines_fail_on_one_line(tmp_path, args, expect, message):
  workdir = tmp_path / 'afile'
  workdir.write_text('not a directory')
  result = run(['-m', 'dictlearn.train', '--config', TINY, '--workdir', str(workdir), *args],
               tmp_path, expect=expect)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines


def test_missing_config_file_is_one_line(tmp_path):
  result = run(['-m', 'dictlearn.train', '--config', 'nope.py', '--workdir', 'w'], tmp_path,
               expect=2)
  assert result.stderr.strip() == (f'error: --config nope.py: no such config file (the '
                                   f'experiments are in {cli.EXPERIMENTS_DIR})')
  assert not (tmp_path / 'w').exists()  # nothing written


def test_help_lists_the_experiments_and_the_fields(tmp_path):
  out = run(['-m', 'dictlearn.train', '--help'], tmp_path).stdout
  assert 'tiny.py' in out and 'smollm2_topk.py' in out and 'experiments/base.py' in out
  assert "--workdir" in out and "--[no]verbose" in out, out


def test_tool_error_is_one_line(tmp_path):
  result = run(['tools/inspect_checkpoint.py', '--workdir', str(tmp_path)], REPO, expect=1)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: no checkpoints in'), lines
  bad_flag = run(['-m', 'dictlearn.evals', '--wrkdir', 'x'], tmp_path, expect=2)
  assert bad_flag.stderr.strip().splitlines()[0].startswith('error: ')


def test_internal_errors_name_their_type_and_the_log(tmp_path, capsys):
  path = logs.setup(str(tmp_path))

  def broken():
    raise TypeError('a bug')

  assert cli._run(broken, path, verbose=False) == 1  # pylint: disable=protected-access
  err = capsys.readouterr().err
  assert err.strip() == f'error: internal error (TypeError: a bug) (traceback in {path})'
  assert 'Traceback' in (tmp_path / 'log.txt').read_text()
  logs.setup(None)  # the console handler only, as before


FAILING_COROUTINE = """
async def write():
  raise ValueError("RESOURCE_EXHAUSTED: Error writing manifest.ocdbt: No space left on device")
"""


def _gather_never_retrieved(path):
  """asyncio's 'exception was never retrieved' for an asyncio.gather future whose
  coroutine, defined in the file `path`, failed: what orbax's writes leave when a save
  fails on a full disk (the future's message names only the exception)."""
  spec = importlib.util.spec_from_file_location('failing_writes', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  async def save():
    future = asyncio.gather(module.write())
    await asyncio.sleep(0.01)
    del future  # failed, its exception never asked for: asyncio logs it when it goes

  loop = asyncio.new_event_loop()
  try:
    loop.run_until_complete(save())
  finally:
    loop.close()
  gc.collect()


def test_orbax_gather_failure_stays_in_the_log_file(tmp_path, capsys):
  """A failed save is reported once, by dictlearn: asyncio's record for orbax's failed
  gather goes to the log file only; the same record for anyone else's code is shown."""
  for package in ('orbax', 'other'):
    os.makedirs(tmp_path / package)
    (tmp_path / package / 'writes.py').write_text(FAILING_COROUTINE)
  path = logs.setup(str(tmp_path / 'logs'))
  try:
    _gather_never_retrieved(str(tmp_path / 'orbax' / 'writes.py'))
    # Only this record's absence: gc.collect() may also finish other tests' leftovers.
    assert 'never retrieved' not in capsys.readouterr().err
    assert '_GatheringFuture exception was never retrieved' in pathlib.Path(path).read_text()
    _gather_never_retrieved(str(tmp_path / 'other' / 'writes.py'))
    assert 'error: _GatheringFuture exception was never retrieved' in capsys.readouterr().err
  finally:
    logs.setup(None)  # the console handler only, as before


def test_as_flags_turns_parsed_arguments_back_into_a_command_line():
  args = argparse.Namespace(n_latents=4096, dtype='bfloat16', verbose=True, dry_run=False,
                            store=None, child=True)
  assert cli.as_flags(args, skip=('child',)) == ['--n_latents=4096', '--dtype=bfloat16',
                                                  '--verbose']
