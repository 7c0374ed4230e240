"""Benchmark: tokens/s of the full SAE training step against the hardware ceiling and peers.

    python tools/bench_train.py [--shapes 576x16384 576x65536] [--batch 4096] [--k 32]
                                [--arch topk batchtopk relu_l1 jumprelu] [--rounds 3]
                                [--dtype float32|bfloat16] [--peers .peers/bin/python]
                                [--loader]

For each architecture and shape: the median time of the whole jitted train step
(forward, loss, backward, gradient processing, Adam, decoder renormalisation,
latent statistics) as `dictlearn.train.trainer.make_train_step` builds it,
compiled once and run on a donated state; the ceiling, the encoder matmul
[batch, d] @ [d, n] alone; and, when the peers' virtual environment exists
(`../shared/bench/peers/README.md`), SAELens and EleutherAI sparsify on the
same shapes. Every round times the ceiling, dictlearn and the peers one after
the other, so the ratios compare figures taken under the same machine load;
the table gives medians over rounds.

MFU: model FLOPs per token (`dictlearn.sae.flops.model_flops_per_token`, the
trainer's and the scaling sweep's formula) x tokens/s over the device's peak
(`dictlearn.train.throughput`; on a CPU, a float32 matmul measured once, printed
first). The ceiling's MFU counts the encoder matmul's own 2 d n FLOPs per token.

The sparse paths of relu_l1 and jumprelu depend on how many latents fire, so
they are timed in two states: `init` (the fresh state: about half the latents
fire, each batch overflows the capacity and runs the exact dense formulation,
as in the first steps of a run) and `L0~k` (the encoder bias set so that each
latent fires on a fraction k / n of this batch's tokens, as in a trained SAE).
The peers' steps do not depend on the state. batchtopk runs with k * 4
candidates per token (`sae.sparse_capacity`), exact with a dense fallback.

`--dtype bfloat16` sets `sae.dtype`: the encoder and decoder products take
bfloat16 inputs (float32 accumulation; parameters and optimizer state stay
float32), and the ceiling is the same product in bfloat16. The peers' scripts
run in float32, so they are left out of a bfloat16 run.

`--loader` adds the loader's throughput from a zarr store and the share of
step time spent waiting for data in a real training run.
"""
import os
import re
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import cli
from dictlearn import host_memory
from dictlearn import sharding as sharding_lib
from dictlearn.sae import make_sae
from dictlearn.sae.flops import model_flops_per_token
from dictlearn.train import schedules
from dictlearn.train import state as state_lib
from dictlearn.train import throughput
from dictlearn.train.trainer import make_train_step
base = cli.experiment('base')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(REPO), 'shared', 'bench', 'peers')


def bench_config(arch: str, n_latents: int, batch: int, k: int, steps: int,
                 dtype: str = 'float32'):
  c = base.get_config()
  c.unlock()
  c.sae.architecture, c.sae.n_latents, c.sae.k = arch, n_latents, k
  c.sae.dtype = dtype
  c.sae.aux_k = 512
  c.sae.sparsity_coefficient = 1.0
  # relu/jumprelu: slots per token on average for the non-zeros; batchtopk:
  # candidates per token.
  c.sae.sparse_capacity = {'relu_l1': 2 * k, 'jumprelu': 2 * k, 'batchtopk': 4 * k}.get(arch, 0)
  c.train.batch_size, c.train.num_steps = batch, steps
  c.mesh.shape = (1, 1)
  c.lock()
  return c


def make_step_runner(arch: str, d: int, n: int, batch: int, k: int, regime: str,
                     dtype: str = 'float32'):
  """A callable timing `repeats` full training steps (median seconds); compiled once."""
  config = bench_config(arch, n, batch, k, steps=1000, dtype=dtype)
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axis_names)
  rules = config.mesh.logical_axis_rules
  sae = make_sae(config.sae, d)
  tx = schedules.make_optimizer(config.optim, config.train.num_steps)
  _, shardings = state_lib.state_shardings(sae, tx, config.seed, mesh, rules)
  state = state_lib.create_state(sae, tx, config.seed, shardings)
  data_sharding = sharding_lib.batch_sharding(mesh, rules)
  step = jax.jit(make_train_step(sae, tx, config), in_shardings=(shardings, data_sharding),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, d)) * 1.0, data_sharding)
  if regime == 'sparse':
    # Each latent fires on about k / n of the tokens (of this batch, through the
    # first steps' small updates): the sparsity a trained SAE has.
    pre = x @ state['params']['W_enc']
    b_enc = -jnp.quantile(pre, 1.0 - k / n, axis=0)
    state['params'] = dict(state['params'],
                           b_enc=jax.device_put(b_enc, shardings['params']['b_enc']))
  box = {'state': state}

  def run(repeats: int) -> tuple[float, dict]:
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      box['state'], metrics = step(box['state'], x)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    return statistics.median(times), metrics

  run(2)  # compile, and let the sparse paths see the state they will be timed on
  # For tools/profile_step.py: the compiled step and its current inputs.
  run.step = step
  run.inputs = lambda: (box['state'], x)
  return run


def time_ceiling(d: int, n: int, batch: int, repeats: int, dtype: str = 'float32') -> float:
  """Median seconds of the encoder matmul alone: the dense [batch, n] product, inputs in
  `dtype` (cast beforehand), float32 accumulation and result as in the SAE."""
  x = jax.random.normal(jax.random.key(0), (batch, d)).astype(dtype)
  w = (jax.random.normal(jax.random.key(1), (d, n)) / np.sqrt(d)).astype(dtype)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(matmul(x, w))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(matmul(x, w))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def run_peer(python: str, script: str, args: list, timeout: int = 1800) -> float | None:
  """tokens/s a peer script prints, or None when it failed (message printed)."""
  cmd = [python, os.path.join(PEERS, script)] + [str(a) for a in args]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    print(f'  peer {script} {args}: timed out after {timeout} s', flush=True)
    return None
  match = re.search(r'([\d.]+) tokens/s', out.stdout)
  if out.returncode or not match:
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ['?']
    print(f'  peer {script} {args}: failed ({tail[0][:200]})', flush=True)
    return None
  return float(match.group(1))


def regimes_of(arch: str) -> list[str]:
  """The states an architecture is timed in (see the module docstring)."""
  return ['init', 'sparse'] if arch in ('relu_l1', 'jumprelu') else ['init']


def peer_runs(arch: str, d: int, n: int, batch: int, k: int, steps: int):
  """(label, script, args) of the peers that run this architecture."""
  if arch in ('topk', 'batchtopk'):
    return [('sparsify topk', 'sparsify_step.py', [d, n, batch, k, steps]),
            ('SAELens topk', 'saelens_step.py', ['topk', d, n, batch, k, steps])]
  if arch in ('relu_l1', 'jumprelu'):
    return [('SAELens standard', 'saelens_step.py', ['standard', d, n, batch, k, steps])]
  return []


def bench_loader(d: int, batch: int, steps: int, window: int = 10) -> None:
  """Loader rows/s from a zarr store, and data wait as a share of a real run's step time.

  The run logs every `window` steps; its first window holds the compilation
  and the loader's start, so the figures are those of the windows after it.
  """
  from dictlearn.data import loader as loader_lib
  from dictlearn.data import store as store_lib
  from dictlearn.train import metrics as metrics_lib
  from dictlearn.train.trainer import train_and_evaluate
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'store')
    writer = store_lib.StoreWriter(path, d, metadata={'model': 'random', 'site': 'bench'})
    rng = np.random.default_rng(0)
    rows = batch * 16
    for start in range(0, rows, 8192):
      writer.append(rng.normal(size=(min(8192, rows - start), d)).astype(np.float32))
    writer.finish()
    reader = store_lib.StoreReader(path)
    mesh = sharding_lib.make_mesh((1, 1), ('data', 'model'))
    sharding = sharding_lib.batch_sharding(mesh, base.get_config().mesh.logical_axis_rules)
    with loader_lib.Loader(reader, batch_size=batch, seed=0, shuffle_window_chunks=16,
                           heldout_tokens=0, scale=1.0, sharding=sharding, prefetch=4) as loader:
      it = iter(loader)
      jax.block_until_ready(next(it))
      t = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(next(it))
      rate = steps * batch / (time.perf_counter() - t)
    print(f'loader: {rate:,.0f} rows/s of d_model {d} f32 from a local zarr3 store '
          f'({rate / batch:.1f} batches of {batch} per second)')
    config = bench_config('topk', 16384, batch, 32, steps=steps + window)
    config.unlock()
    config.data.store, config.data.heldout_tokens = path, 0
    config.train.log_every, config.train.checkpoint_every = window, 10 ** 9
    config.train.eval_batches = 0
    config.lock()
    workdir = os.path.join(tmp, 'run')
    train_and_evaluate(config, workdir)
    later = metrics_lib.read_metrics(workdir, 'train')[1:]
    wait = statistics.mean(r['data_wait_fraction'] for r in later)
    tokens = statistics.mean(r['tokens_per_second'] for r in later)
    print(f'training run (topk 16384, batch {batch}, steps {window + 1}-{steps + window} of a '
          f'real run from that store): data wait = {100 * wait:.2f}% of step time, '
          f'{tokens:,.0f} tokens/s')


def main(argv=None) -> int:
  p = cli.ArgumentParser(description='SAE training-step throughput vs ceiling and peers')
  p.add_argument('--shapes', nargs='+', default=['576x16384', '576x65536'])
  p.add_argument('--batch', type=int, default=4096)
  p.add_argument('--k', type=int, default=32)
  p.add_argument('--arch', nargs='+', default=['topk', 'batchtopk', 'relu_l1', 'jumprelu'])
  p.add_argument('--rounds', type=int, default=3, help='alternations with the peers')
  p.add_argument('--repeats', type=int, default=3, help='timed steps per round')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                 help='sae.dtype: the input dtype of the encoder and decoder products')
  p.add_argument('--peers', default=os.path.join(REPO, '.peers', 'bin', 'python'))
  p.add_argument('--no-peers', action='store_true')
  p.add_argument('--loader', action='store_true', help='also benchmark the loader')
  args = p.parse_args(argv)
  use_peers = not args.no_peers and os.path.exists(args.peers) and args.dtype == 'float32'
  print(f'devices: {jax.devices()}; batch {args.batch}, k {args.k}, sae.dtype {args.dtype}; '
        f'{args.rounds} rounds of {args.repeats} steps; '
        f'peers: {args.peers if use_peers else "none"}', flush=True)
  peak = throughput.peak_flops(jax.devices()[:1], args.dtype)
  how = 'measured by a 1024x1024 matmul' if jax.devices()[0].platform == 'cpu' else 'table'
  print(f'peak: {peak / 1e9:,.1f} GFLOP/s {args.dtype} for {jax.devices()[0].device_kind} ({how}); '
        f'load average {" ".join(f"{v:.2f}" for v in os.getloadavg())}',
        flush=True)
  rows = []
  for shape in args.shapes:
    d, n = (int(v) for v in shape.split('x'))
    runners = {}
    for arch in args.arch:
      for regime in regimes_of(arch):
        runners[(arch, regime)] = make_step_runner(arch, d, n, args.batch, args.k, regime,
                                                   args.dtype)
        # The warm-up's temporaries stay in the heap (host_memory); without this,
        # every architecture at 65536 latents in one process reached 17.5 GiB.
        host_memory.release_freed_memory()
    # Each peer runs once a round, shared by the architectures it is compared with.
    peer_jobs = {}
    for arch in args.arch:
      for label, script, peer_args in peer_runs(arch, d, n, args.batch, args.k, args.repeats):
        peer_jobs[label] = (script, peer_args)
    ceilings, ours, peers, extra = [], {key: [] for key in runners}, {}, {}
    for r in range(args.rounds):
      ceilings.append(time_ceiling(d, n, args.batch, args.repeats, args.dtype))
      for key, run in runners.items():
        seconds, metrics = run(args.repeats)
        ours[key].append(seconds)
        extra[key] = {m: float(metrics[m]) for m in ('l0', 'overflow', 'selection_fallback')
                      if m in metrics}
      if use_peers:
        for label, (script, peer_args) in peer_jobs.items():
          host_memory.release_freed_memory()  # the peer's process needs the memory
          rate = run_peer(args.peers, script, peer_args)
          if rate is not None:
            peers.setdefault(label, []).append(rate)
      print(f'  {shape}: round {r + 1}/{args.rounds} done', flush=True)
    del runners
    ceiling_rate = args.batch / statistics.median(ceilings)
    for (arch, regime), seconds in ours.items():
      rate = args.batch / statistics.median(seconds)
      state = {'init': 'init', 'sparse': 'L0~k'}[regime]
      note = ', '.join(f'{m} {v:.3g}' for m, v in extra[(arch, regime)].items())
      flops = model_flops_per_token(arch, n, d, args.k, sparse_kernels=arch != 'topk',
                                    l0=extra[(arch, regime)].get('l0'))
      row = (f'{arch:9s} {state:5s} d={d} n={n:<6d} {rate:8,.0f} tok/s MFU '
             f'{100 * rate * flops / peak:5.1f}% | ceiling {ceiling_rate:8,.0f} tok/s (MFU '
             f'{100 * ceiling_rate * 2 * d * n / peak:5.1f}%), {100 * rate / ceiling_rate:5.1f}%')
      for label, _, _ in peer_runs(arch, d, n, args.batch, args.k, args.repeats):
        if label in peers:
          peer = statistics.median(peers[label])
          row += f' | {label} {peer:6,.0f} tok/s, x{rate / peer:.2f}'
      if note:
        row += f' | last step: {note}'
      print(row, flush=True)
      rows.append(row)
  print('\n'.join(['', 'summary (medians over rounds):'] + rows), flush=True)
  if args.loader:
    bench_loader(576, args.batch, steps=30)
  return 0


if __name__ == '__main__':
  cli.run_main(main)
