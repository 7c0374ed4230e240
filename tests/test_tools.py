"""The inspection tools and the evaluation command, run as a user runs them."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from dictlearn.train.trainer import train_and_evaluate
from experiments import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_inspect_checkpoint_store_and_evals(tmp_path):
  config = tiny.get_config()
  config.unlock()
  config.mesh.shape = (2, 4)
  config.lock()
  summary = train_and_evaluate(config, str(tmp_path))
  info = json.loads(run(['tools/inspect_checkpoint.py', '--workdir', str(tmp_path), '--json']))
  assert info['step'] == 20 and info['architecture'] == 'topk'
  assert info['parameters']['W_dec']['shape'] == [128, 16]
  assert "'model'" in info['parameters']['W_dec']['sharding']  # saved latent-sharded
  assert abs(info['decoder_norms']['mean'] - 1) < 1e-4  # topk keeps unit decoder rows
  assert info['last_eval_metrics']['fvu'] == summary['eval']['fvu']
  text = run(['tools/inspect_checkpoint.py', '--workdir', str(tmp_path), '--step', '10'])
  assert 'step       10' in text and 'decoder row norms' in text
  store_text = run(['tools/inspect_store.py', str(tmp_path / 'data')])
  assert '16384' in store_text
  evaluation = json.loads(run(['-m', 'dictlearn.evals', '--workdir', str(tmp_path)]))
  assert abs(evaluation['fvu'] - summary['eval']['fvu']) < 1e-5
  assert evaluation['step'] == 20


# Scripts that run in the peers' environment (PyTorch, sae_lens, sparsify), not this one.
PEERS_SCRIPTS = {'check_saelens_format.py', 'check_sparsify_format.py', 'peers_data.py',
                 'saelens_train.py', 'sparsify_train.py'}

LOAD_TOOLS = r'''
import os, runpy, sys
start = list(sys.path)
for path in sys.argv[1:]:
  sys.path[:] = [os.path.dirname(path)] + start[1:]  # as `python tools/x.py` sets it
  for name in [m for m in sys.modules if m == 'experiments' or m.startswith('experiments.')]:
    del sys.modules[name]  # each tool finds experiments/ by itself
  runpy.run_path(path, run_name='tool_under_test')  # its imports, not its main()
'''


def test_every_tool_loads_as_a_script_from_another_directory(tmp_path):
  """`python tools/x.py` has tools/, not the checkout, on sys.path: every tool's imports
  (experiments included, through `cli.experiment`) must work from any directory."""
  tools = sorted(os.path.join(REPO, 'tools', name)
                 for name in os.listdir(os.path.join(REPO, 'tools'))
                 if name.endswith('.py') and name not in PEERS_SCRIPTS)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run([sys.executable, '-c', LOAD_TOOLS] + tools, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def test_profile_step_attributes_the_step_to_primitives():
  """tools/profile_step.py reads XLA's trace back: the encoder product, the top-k
  (a custom call with a tuple result) and the sparse scatter-adds each get time."""
  # Big enough that each scatter-add (2 x 4096 rows of 64 floats) takes some microseconds:
  # at 16x1024, batch 256, k 4 one rounded to 0.00 ms in a CI run.
  text = run(['tools/profile_step.py', '--arch', 'topk', '--shape', '64x2048', '--batch', '512',
              '--k', '8', '--steps', '2', '--top', '50'])
  assert 'ms per step untraced' in text and 'busy' in text
  table = text.split('primitive')[1].split('XLA op')[0].strip().splitlines()[1:]
  primitives = {name.strip(): float(ms) for name, ms in (line.rsplit(None, 1) for line in table)}
  for name in ('dot_general', 'top_k', 'scatter-add'):
    assert primitives.get(name, 0) > 0, text
  bad = subprocess.run([sys.executable, 'tools/profile_step.py', '--shape', '576by16'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and '--shape must be DxN' in bad.stderr


def test_bench_harvest_times_whole_batches(smollm2, tmp_path):
  """tools/bench_harvest.py sets each harvest's token budget to the rows of exactly N
  full batches: the harvest then forwards N batches, with no partly used last one
  (which would count a forward's time for a fraction of its rows)."""
  sys.path.insert(0, os.path.join(REPO, 'tools'))
  try:
    import bench_harvest  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  from dictlearn import harvest as harvest_lib  # pylint: disable=import-outside-toplevel
  args = argparse.Namespace(batch=2, context=32, deep_site='blocks.0.hook_resid_post',
                            dtype='float32')
  one, three = (bench_harvest.whole_batch_budget(smollm2, args, n) for n in (1, 3))
  assert 0 < one < three <= 3 * 2 * (32 - 1)
  for budget, contexts in ((three, 6), (three + 1, 7)):
    config = bench_harvest._config(args, args.deep_site, budget)  # pylint: disable=protected-access
    summary = harvest_lib.harvest(config, str(tmp_path / str(budget)), model=smollm2)
    assert (summary['n_tokens'], summary['n_contexts']) == (budget, contexts)
  with pytest.raises(SystemExit, match='the built-in corpus has'):
    bench_harvest.whole_batch_budget(smollm2, args, 10 ** 6)
