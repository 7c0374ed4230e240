"""Throughput and memory of the feature-statistics pass against the trainer's step.

    python tools/bench_features.py [--dir /work/bench_features] [--n_latents 1048576]
        [--store_tokens 1048576] [--tokens 16384] [--batch 4096] [--k 32] [--block 16384]
        [--train_steps 3]

1. Prepares once, under --dir: a synthetic activation store of --store_tokens rows of
   d_model 576 (random rows with made-up token ids and documents, written with
   `StoreWriter`), and a run directory holding a randomly initialised TopK SAE of
   --n_latents latents (params, buffers, config and run facts: what
   `dictlearn.analysis.features` reads of a checkpoint).
2. Runs the statistics pass over the first --tokens rows of that store in a fresh
   subprocess (one CPU device, encoder in blocks of --block latents, batches of
   --batch rows) through the contexts stage (a synthetic store has no language model:
   no logit stage), and reports the pass's tokens/s after its first (compiling)
   batch, the contexts stage's seconds, and the subprocess's peak resident memory.
3. Runs the trainer's step at the same shape (TopK, --n_latents, --batch, --k,
   --block; `tools/bench_memory.py`'s step child) and reports its tokens/s and peak
   resident memory, when the machine has --train_min_gib of memory available (the
   step at 2^20 latents peaks near 21 GiB; on a shared machine it would push other
   processes out), otherwise says that it skipped it.

Check free disk first (`df -h`): the store takes --store_tokens * 576 * 4 bytes and the
SAE 2 * n_latents * 576 * 4 bytes. Prints figures; not a test.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

from dictlearn import cli  # no jax: the parent process measures its children only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = float(1 << 30)
D_MODEL = 576


def prepare_store(path, n_tokens):
  """A finished synthetic store of n_tokens rows (kept when already there)."""
  import numpy as np
  from dictlearn.data import store as store_lib
  manifest, _ = store_lib.read_status(path)
  if manifest is not None and manifest['n_tokens'] == n_tokens:
    return
  writer = store_lib.StoreWriter(path, D_MODEL, metadata={'model': 'synthetic-bench',
                                                          'site': 'blocks.12.hook_resid_post'})
  rng = np.random.default_rng(0)
  step = 1 << 16
  for start in range(writer.n_committed, n_tokens, step):
    n = min(step, n_tokens - start)
    rows = np.arange(start, start + n)
    writer.append(rng.standard_normal((n, D_MODEL), dtype=np.float32),
                  tokens=rng.integers(0, 49152, n), doc=rows // 500, pos=rows % 500)
  writer.finish()


def prepare_run(workdir, store, args):
  """A run directory with a random TopK SAE checkpoint (params and buffers only)."""
  import jax
  from dictlearn.data import loader as loader_lib
  from dictlearn.data import store as store_lib
  from dictlearn.sae import make_sae
  from dictlearn.train import checkpoint as ckpt_lib
  import bench_memory
  if ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(workdir)) is not None:
    return
  config = bench_memory.make_config(_memory_args(args), (1, 1))
  config.unlock()
  config.data.store = store
  config.lock()
  sae = make_sae(config.sae, D_MODEL)
  params, buffers = jax.jit(sae.init)(jax.random.key(0))
  reader = store_lib.StoreReader(store)
  run_info = {'store': store, 'd_model': D_MODEL,
              'data_scale': loader_lib.normalization_scale(reader)}
  manager = ckpt_lib.make_manager(ckpt_lib.checkpoint_dir(workdir), async_save=False)
  ckpt_lib.save(manager, 0, {'params': params, 'buffers': buffers}, config.to_dict(), run_info)
  manager.wait_until_finished()
  manager.close()


def _memory_args(args):
  return argparse.Namespace(n_latents=args.n_latents, d_model=D_MODEL, batch=args.batch, k=args.k,
                            block=args.block, state_dtype='bfloat16', steps=args.train_steps,
                            devices=1, peers='')


def statistics_child(args):
  """In a subprocess: the statistics pass; prints its timing and peak memory as JSON."""
  from dictlearn.analysis import features
  workdir = os.path.join(args.dir, 'run')
  out = features.compute_statistics(workdir, out=os.path.join(args.dir, 'features'), options=
                                    features.Options(batch_size=args.batch, tokens=args.tokens,
                                                     progress=False), restart=True)
  with open(os.path.join(out, features.RESULT), encoding='utf-8') as f:
    timing = json.load(f)['timing']
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
  print(json.dumps(dict(timing, peak_rss_gib=rss)))


def run_child(args):
  cmd = [sys.executable, os.path.abspath(__file__), '--child'] + cli.as_flags(
      args, skip=('child',))
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    raise RuntimeError(f'statistics child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1])


def available_gib():
  """MemAvailable of /proc/meminfo, GiB."""
  with open('/proc/meminfo', encoding='utf-8') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024 / GIB
  return 0.0


def main(argv=None):
  p = cli.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dir', default='/work/bench_features', help='store and run directory')
  p.add_argument('--n_latents', type=int, default=1 << 20)
  p.add_argument('--store_tokens', type=int, default=1 << 20)
  p.add_argument('--tokens', type=int, default=16384, help='rows the timed pass reads')
  p.add_argument('--batch', type=int, default=4096)
  p.add_argument('--k', type=int, default=32)
  p.add_argument('--block', type=int, default=16384)
  p.add_argument('--train_steps', type=int, default=3, help='0 skips the trainer step')
  p.add_argument('--train_min_gib', type=float, default=22.0,
                 help='memory that must be available to run the trainer step')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    statistics_child(args)
    return 0
  os.makedirs(args.dir, exist_ok=True)
  store = os.path.join(args.dir, 'store')
  t = time.perf_counter()
  prepare_store(store, args.store_tokens)
  prepare_run(os.path.join(args.dir, 'run'), store, args)
  print(f'prepared {args.store_tokens:,}-row store and a {args.n_latents:,}-latent TopK SAE in '
        f'{args.dir} ({time.perf_counter() - t:.0f} s)')
  stats = run_child(args)
  rate = stats['pass_rows'] / max(stats['pass_seconds'], 1e-9)
  print(f'statistics pass: {args.n_latents:,} latents, batch {args.batch}, block {args.block}: '
        f'{rate:,.0f} tokens/s over {stats["pass_rows"]:,} rows after the first batch; '
        f'contexts stage {stats.get("contexts_seconds", 0):.1f} s; '
        f'peak resident memory {stats["peak_rss_gib"]:.2f} GiB')
  available = available_gib()
  if not args.train_steps or available < args.train_min_gib:
    print(f'train step at the same shape: skipped ({available:.1f} GiB available, '
          f'--train_min_gib {args.train_min_gib}); BUILD_NOTES.md has its figures')
    print(f'load average: {open("/proc/loadavg").read().strip()}')
    return 0
  import bench_memory
  steps = bench_memory.child('steps', _memory_args(args))
  step_s = min(steps['step_s'][1:] or steps['step_s'])
  print(f'train step at the same shape (k {args.k}, Adam moments in bfloat16): '
        f'{args.batch / step_s:,.0f} tokens/s ({step_s:.2f} s/step, best of '
        f'{len(steps["step_s"])}); peak resident memory {steps["peak_rss_gib"]:.2f} GiB')
  print(f'statistics pass / train step throughput: {rate / (args.batch / step_s):.2f}')
  print(f'load average: {open("/proc/loadavg").read().strip()}')
  return 0


if __name__ == '__main__':
  cli.run_main(main)
