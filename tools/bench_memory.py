"""Memory of a million-latent TopK SAE trained through the real train step.

    python tools/bench_memory.py [--n_latents 1048576] [--d_model 576] [--batch 4096]
                                 [--k 32] [--block 16384] [--state_dtype bfloat16]
                                 [--steps 3] [--devices 8] [--peers .peers/bin/python]

Two measurements, each in a fresh subprocess so that its peak resident memory is
its own:

1. One device: builds the state (float32 parameters, Adam moments in
   --state_dtype), compiles the step that `dictlearn.train.trainer.make_train_step`
   builds (encoder in blocks of --block latents), runs --steps steps on random
   data and reports the compiled step's buffer sizes (XLA's memory analysis),
   the time of each step and the process's peak resident memory (ru_maxrss).
2. --devices fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)
   on a (1, devices) mesh, latent axis sharded: creates the same state in its
   shardings and reports, from each array's `addressable_shards`, the bytes of
   parameters and optimizer state held by one device against the total.

3. When the peers' virtual environment exists (`../shared/bench/peers/README.md`):
   EleutherAI sparsify's and SAELens's TopK steps at the same shape, each in a
   subprocess whose address space is limited to the machine's physical memory (so
   that a peer which cannot fit fails with its own allocation error instead of
   waking the kernel's OOM killer); reports its peak resident memory, or the error.

Not a test (tests/test_memory.py checks the same properties at a small size).
"""
import argparse
import json
import os
import subprocess
import sys
import time

from dictlearn import cli
from dictlearn import cli  # no jax: the parent process measures its children only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(REPO), 'shared', 'bench', 'peers')
GIB = float(1 << 30)


def make_config(args, mesh_shape):
  """The experiment config of the measurement (TopK, blocked encoder, no evaluation)."""
  base = cli.experiment('base')
  c = base.get_config()
  c.unlock()
  c.sae.architecture = 'topk'
  c.sae.n_latents = args.n_latents
  c.sae.k = args.k
  c.sae.encoder_block_size = args.block
  c.optim.state_dtype = args.state_dtype
  c.train.batch_size = args.batch
  c.train.num_steps = 1000
  c.mesh.shape = mesh_shape
  c.lock()
  return c


def build(args, mesh_shape):
  """(sae, tx, config, mesh, shardings) for the measurement."""
  from dictlearn import sharding as sharding_lib
  from dictlearn.sae import make_sae
  from dictlearn.train import schedules
  from dictlearn.train import state as state_lib
  config = make_config(args, mesh_shape)
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axis_names)
  sae = make_sae(config.sae, args.d_model)
  tx = schedules.make_optimizer(config.optim, config.train.num_steps)
  abstract, shardings = state_lib.state_shardings(sae, tx, config.seed, mesh,
                                                  config.mesh.logical_axis_rules)
  return sae, tx, config, mesh, abstract, shardings


def peak_rss_gib() -> float:
  """This process's peak resident memory so far (ru_maxrss, KiB on Linux)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def tree_bytes(tree):
  import jax
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def run_steps(args) -> dict:
  """Child 1: compile and run the full train step on one device."""
  import jax
  import jax.numpy as jnp
  from dictlearn import sharding as sharding_lib
  from dictlearn.train import state as state_lib
  from dictlearn.train.trainer import make_train_step
  sae, tx, config, mesh, abstract, shardings = build(args, (1, 1))
  rules = config.mesh.logical_axis_rules
  data_sharding = sharding_lib.batch_sharding(mesh, rules)
  step = jax.jit(make_train_step(sae, tx, config), in_shardings=(shardings, data_sharding),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)
  batch = jax.ShapeDtypeStruct((args.batch, args.d_model), jnp.float32)
  t = time.perf_counter()
  compiled = step.lower(abstract, batch).compile()
  compile_s = time.perf_counter() - t
  analysis = compiled.memory_analysis()
  state = state_lib.create_state(sae, tx, config.seed, shardings)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (args.batch, args.d_model)),
                     data_sharding)
  jax.block_until_ready((state, x))
  after_init = peak_rss_gib()
  times, metrics = [], None
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, x)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return {
      'params_gib': tree_bytes(state['params']) / GIB,
      'opt_state_gib': tree_bytes(state['opt_state']) / GIB,
      'compiled_arguments_gib': analysis.argument_size_in_bytes / GIB,
      'compiled_temp_gib': analysis.temp_size_in_bytes / GIB,
      'compile_s': compile_s,
      'step_s': times,
      'loss': float(metrics['loss']),
      'peak_rss_after_init_gib': after_init,
      'peak_rss_gib': peak_rss_gib(),
  }


def shard_bytes(args) -> dict:
  """Child 2: per-device bytes of the latent-sharded state on `devices` fake devices."""
  import jax
  from dictlearn.train import state as state_lib
  sae, tx, config, mesh, abstract, shardings = build(args, (1, args.devices))
  state = state_lib.create_state(sae, tx, config.seed, shardings)
  out = {'devices': len(jax.devices())}
  for part in ('params', 'opt_state'):
    leaves = jax.tree.leaves(state[part])
    total = sum(leaf.nbytes for leaf in leaves)
    per_device = {}
    for leaf in leaves:
      for shard in leaf.addressable_shards:
        per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    out[part] = {'total_gib': total / GIB, 'max_per_device_gib': max(per_device.values()) / GIB,
                 'fraction': max(per_device.values()) / total}
  return out


def child(mode, args) -> dict:
  """Runs this file in a subprocess in `mode`; returns its JSON result."""
  env = dict(os.environ)
  if mode == 'shards':
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={args.devices}').strip()
  cmd = [sys.executable, os.path.abspath(__file__), f'--child={mode}'] + cli.as_flags(
      args, skip=('child',))
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{mode} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1])


def peer_memory(python, script, argv) -> str:
  """One peer step script run under RLIMIT_AS = physical memory: its result line and peak
  resident memory, or the last line of its error."""
  import resource
  import tempfile
  limit = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')

  def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

  with tempfile.TemporaryFile('w+') as log:
    proc = subprocess.Popen([python, os.path.join(PEERS, script)] + [str(a) for a in argv],
                            stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=cap)
    _, status, usage = os.wait4(proc.pid, 0)  # its own rusage, not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    lines = [l.strip() for l in log.read().splitlines() if l.strip()]
  rss = usage.ru_maxrss * 1024 / GIB
  if proc.returncode == 0 and lines:
    return f'{lines[-1]}; peak resident memory {rss:.2f} GiB'
  return (f'failed (exit {proc.returncode}) under a {limit / GIB:.1f} GiB address-space limit '
          f'after {rss:.2f} GiB resident: {lines[-1] if lines else "no output"}')


def main(argv=None) -> int:
  p = cli.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--n_latents', type=int, default=1 << 20)
  p.add_argument('--d_model', type=int, default=576)
  p.add_argument('--batch', type=int, default=4096)
  p.add_argument('--k', type=int, default=32)
  p.add_argument('--block', type=int, default=16384, help='sae.encoder_block_size')
  p.add_argument('--state_dtype', default='bfloat16', help='optim.state_dtype')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--devices', type=int, default=8)
  p.add_argument('--peers', default=os.path.join(REPO, '.peers', 'bin', 'python'),
                 help="the peers' Python; skipped when it does not exist")
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    result = run_steps(args) if args.child == 'steps' else shard_bytes(args)
    print(json.dumps(result), flush=True)
    return 0
  bsz, n, d = args.batch, args.n_latents, args.d_model
  print(f'TopK SAE: d_model {d}, {n} latents, batch {bsz}, k {args.k}, encoder blocks of '
        f'{args.block}, Adam moments in {args.state_dtype}; a dense [batch, n_latents] '
        f'float32 array would take {bsz * n * 4 / GIB:.1f} GiB', flush=True)
  r = child('steps', args)
  print(f"one device: parameters {r['params_gib']:.2f} GiB, optimizer state "
        f"{r['opt_state_gib']:.2f} GiB; compiled step: arguments "
        f"{r['compiled_arguments_gib']:.2f} GiB, temporaries {r['compiled_temp_gib']:.2f} GiB "
        f"(all branches; compile {r['compile_s']:.0f} s)")
  print(f"  {len(r['step_s'])} full train steps: " +
        ', '.join(f'{s:.1f} s' for s in r['step_s']) + f" (loss {r['loss']:.4g}); "
        f"peak resident memory {r['peak_rss_gib']:.2f} GiB (after creating the state: "
        f"{r['peak_rss_after_init_gib']:.2f} GiB)", flush=True)
  s = child('shards', args)
  for part in ('params', 'opt_state'):
    q = s[part]
    print(f"{s['devices']} devices, mesh (1, {args.devices}), latent axis sharded: {part} "
          f"{q['total_gib']:.3f} GiB in all, {q['max_per_device_gib']:.4f} GiB on the fullest "
          f"device = 1/{1 / q['fraction']:.3f} of the total")
  if not os.path.exists(args.peers):
    print(f'peers: none ({args.peers} does not exist)')
    return 0
  for label, script, peer_args in (
      ('sparsify topk', 'sparsify_step.py', [d, n, bsz, args.k, 1]),
      ('SAELens topk', 'saelens_step.py', ['topk', d, n, bsz, args.k, 1])):
    print(f'{label}, same shape, one step: ' + peer_memory(args.peers, script, peer_args),
          flush=True)
  return 0


if __name__ == '__main__':
  cli.run_main(main)
