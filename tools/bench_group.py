"""Benchmark: N SAEs trained on one read of the data against N runs one after another.

    python tools/bench_group.py [--n 4] [--d_model 576] [--n_latents 4096] [--k 32]
                                [--batch 1024] [--steps 60] [--window 10]

Writes a random activation store (zarr3, float32) of `steps * batch` rows to a
temporary directory, then trains N TopK SAEs that share the data order (sizes
n_latents / 2**i, i < N, so that they differ) twice:

    group     `dictlearn.train.group.train_group`: each batch read once, every
              SAE's step in one jitted function;
    separate  `train_and_evaluate` per SAE, one after the other.

For each, tokens/s per SAE = tokens each SAE trains on / wall time to train all N
(the first logging window, which holds the compilation, left out: figures from
the metrics' tokens_per_second of the later windows), and rows read from the
store per SAE (`Loader.rows_read`). Prints a Markdown table (BUILD_NOTES.md).

`--vmap` times instead why same-shaped members are not stacked: N identical
TopK steps side by side in one jit against one `jax.vmap`ped step over the
stacked states (vmap turns the sparse paths' `lax.cond`s into selects that run
both branches).
"""
import argparse
import os
import statistics
import sys
import tempfile

import time

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import cli
from dictlearn.data import store as store_lib
from dictlearn.sae import make_sae
from dictlearn.train import schedules
from dictlearn.train import state as state_lib
from dictlearn.train import group as group_lib
from dictlearn.train import metrics as metrics_lib
from dictlearn.train.trainer import make_train_step, train_and_evaluate
base = cli.experiment('base')


def make_config(args, n_latents, store):
  c = base.get_config()
  c.unlock()
  c.data.store, c.data.heldout_tokens = store, 0
  c.sae.architecture, c.sae.n_latents, c.sae.k, c.sae.aux_k = 'topk', n_latents, args.k, 256
  c.train.batch_size, c.train.num_steps = args.batch, args.steps
  c.train.log_every, c.train.checkpoint_every = args.window, 10 ** 9
  c.train.eval_batches = 0
  c.mesh.shape = (1, 1)
  c.lock()
  return c


def steady_rate(workdir):
  """Median tokens/s of the logging windows after the first (which holds compilation)."""
  return statistics.median(r['tokens_per_second']
                           for r in metrics_lib.read_metrics(workdir, 'train')[1:])


def bench_vmap(args) -> None:
  """Median seconds of N same-shaped steps side by side in one jit, and vmapped."""
  config = make_config(args, args.n_latents, '')
  sae = make_sae(config.sae, args.d_model)
  tx = schedules.make_optimizer(config.optim, config.train.num_steps)
  step = make_train_step(sae, tx, config)
  states = tuple(jax.jit(lambda s=s: state_lib.init_state(sae, tx, s))() for s in range(args.n))
  x = jax.random.normal(jax.random.key(0), (args.batch, args.d_model))
  side = jax.jit(lambda sts, b: tuple(step(s, b) for s in sts))
  vmapped = jax.jit(jax.vmap(step, in_axes=(0, None)))
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)

  def seconds(fn, arg, repeats=5):
    jax.block_until_ready(fn(arg, x))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(arg, x))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  rounds = [(seconds(side, states), seconds(vmapped, stacked)) for _ in range(3)]
  a, b = (statistics.median(r[i] for r in rounds) for i in (0, 1))
  load = ' '.join(f'{v:.2f}' for v in os.getloadavg())
  print(f'{args.n} TopK steps (d_model {args.d_model}, n_latents {args.n_latents}, k {args.k}, '
        f'batch {args.batch}): side by side {a * 1e3:.0f} ms, vmapped {b * 1e3:.0f} ms '
        f'({b / a:.1f}x); load average {load}')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--n', type=int, default=4)
  p.add_argument('--d_model', type=int, default=576)
  p.add_argument('--n_latents', type=int, default=4096)
  p.add_argument('--k', type=int, default=32)
  p.add_argument('--batch', type=int, default=1024)
  p.add_argument('--steps', type=int, default=60)
  p.add_argument('--window', type=int, default=10)
  p.add_argument('--vmap', action='store_true', help='time side by side against vmap instead')
  args = p.parse_args(argv)
  if args.vmap:
    bench_vmap(args)
    return 0
  sizes = [max(args.k * 2, args.n_latents >> i) for i in range(args.n)]
  with tempfile.TemporaryDirectory() as tmp:
    store = os.path.join(tmp, 'store')
    writer = store_lib.StoreWriter(store, args.d_model, metadata={'model': 'random', 'site': 'bench'})
    rng = np.random.default_rng(0)
    for start in range(0, args.steps * args.batch, 8192):
      rows = min(8192, args.steps * args.batch - start)
      writer.append(rng.normal(size=(rows, args.d_model)).astype(np.float32))
    writer.finish()
    configs = [make_config(args, n, store) for n in sizes]

    group_dirs = [os.path.join(tmp, f'group{i}') for i in range(args.n)]
    summaries = group_lib.train_group(configs, group_dirs)
    group_rate = steady_rate(group_dirs[0])  # every SAE takes a step per group step
    group_read = summaries[0]['rows_read'] / args.n

    alone_rates, alone_read = [], []
    for i, config in enumerate(configs):
      summary = train_and_evaluate(config, os.path.join(tmp, f'alone{i}'))
      alone_rates.append(steady_rate(os.path.join(tmp, f'alone{i}')))
      alone_read.append(summary['rows_read'])
  # N runs one after another: each SAE's share of the wall time is 1/N of the sum.
  separate_rate = 1.0 / sum(1.0 / r for r in alone_rates)
  row_bytes = args.d_model * 4
  load = ' '.join(f'{v:.2f}' for v in os.getloadavg())
  print(f'{args.n} TopK SAEs (n_latents {sizes}, k {args.k}) on d_model {args.d_model}, batch '
        f'{args.batch}, {args.steps} steps, one CPU device; load average {load}\n')
  print('| training | tokens/s per SAE | rows read per SAE | MiB read per SAE |')
  print('| --- | ---: | ---: | ---: |')
  print(f'| {args.n} SAEs in one group (one read) | {group_rate:,.0f} | {group_read:,.0f} | '
        f'{group_read * row_bytes / 2**20:,.1f} |')
  print(f'| {args.n} separate runs, one after another | {separate_rate:,.0f} | '
        f'{statistics.mean(alone_read):,.0f} | {statistics.mean(alone_read) * row_bytes / 2**20:,.1f} |')
  print(f'\n(each run alone: {", ".join(f"{r:,.0f}" for r in alone_rates)} tokens/s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
