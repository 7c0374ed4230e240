"""What the integrity checks cost: checkpoint checksums, and store chunk checksums and
finite-row checks on read.

    python tools/bench_integrity.py [--n_latents 65536] [--d_model 576] [--rows 262144]

Prints (1) the time of `checkpoint.state_checksums` over a TopK train state
(params and Adam moments) against the time of a checkpoint save of it (which
includes them),
and (2) the read throughput of a store in the version-1 layout (no crc32c) and
in the current one (crc32c per chunk, non-finite rows refused), read chunk by
chunk as the loader reads it. Run it on a quiet machine: it reports the load
average beside the figures.
"""
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
import tensorstore as ts

from dictlearn import cli
from dictlearn.data import store as store_lib
from dictlearn.sae import make_sae
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import schedules
from dictlearn.train import state as state_lib
base = cli.experiment('base')


def _best(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), statistics.median(times)


def bench_checksums(n_latents, d_model, directory, repeats):
  config = base.get_config()
  with config.unlocked():
    config.sae.n_latents = n_latents
  sae = make_sae(config.sae, d_model)
  tx = schedules.make_optimizer(config.optim, config.train.num_steps)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'model'))
  _, shardings = state_lib.state_shardings(sae, tx, 0, mesh, config.mesh.logical_axis_rules)
  state = state_lib.create_state(sae, tx, 0, shardings)
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  ckpt_lib.state_checksums(state)  # compile
  best, median = _best(lambda: ckpt_lib.state_checksums(state), repeats)
  manager = ckpt_lib.make_manager(os.path.join(directory, 'checkpoints'), async_save=False)
  saves = []
  for step in range(repeats):
    start = time.perf_counter()
    ckpt_lib.save(manager, step, state, {}, {})  # checksums included
    saves.append(time.perf_counter() - start)
  manager.close()
  print(f'checksums  state of {size / 2**20:,.0f} MiB ({n_latents} latents x {d_model}): '
        f'{best * 1e3:.1f} ms best, {median * 1e3:.1f} ms median; an orbax save of it '
        f'{min(saves) * 1e3:.0f} ms best ({100 * best / min(saves):.1f}% of a save)')


def _write_store(path, rows, d_model, version):
  x = np.random.default_rng(0).standard_normal((rows, d_model)).astype(np.float32)
  writer = store_lib.StoreWriter(path, d_model, metadata={'model': 'bench', 'site': 'bench'})
  writer.append(x)
  writer.finish()
  if version == 1:  # the same array rewritten without the chunks' crc32c
    kvstore = store_lib.kvstore_spec(os.path.join(path, store_lib.ACTIVATIONS))
    with open(os.path.join(kvstore['path'], 'zarr.json'), encoding='utf-8') as f:
      metadata = json.load(f)
    inner = metadata['codecs'][0]['configuration']['codecs']
    metadata['codecs'][0]['configuration']['codecs'] = [c for c in inner if c['name'] != 'crc32c']
    array = ts.open({'driver': 'zarr3', 'kvstore': kvstore, 'metadata': metadata},
                    create=True, delete_existing=True).result()
    array.write(x).result()


def bench_store(rows, d_model, directory, repeats):
  for version in (1, 2):
    path = os.path.join(directory, f'store_v{version}')
    _write_store(path, rows, d_model, version)
    reader = store_lib.StoreReader(path)
    cr = reader.chunk_rows

    def read_all():
      futures = [reader.read_rows_async(c * cr, min((c + 1) * cr, rows))
                 for c in range(reader.n_chunks)]
      for f in futures:
        f.result()

    read_all()
    best, median = _best(read_all, repeats)
    mib = rows * d_model * 4 / 2**20
    label = 'version 1 (no crc32c)' if version == 1 else 'version 2 (crc32c)   '
    print(f'store read {label}: {mib / best:,.0f} MiB/s best, {mib / median:,.0f} MiB/s '
          f'median ({mib:.0f} MiB in {reader.n_chunks} chunks, finite check included)')
  x = np.zeros((cr, d_model), np.float32)
  finite, _ = _best(lambda: store_lib.finite_rows(x), repeats * 10)
  print(f'finite-row check alone: {cr * d_model * 4 / 2**20 / finite:,.0f} MiB/s')


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n_latents', type=int, default=65536)
  parser.add_argument('--d_model', type=int, default=576)
  parser.add_argument('--rows', type=int, default=262144)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args(argv)
  print(f'load average {open("/proc/loadavg").read().split()[:3]}, {os.cpu_count()} CPUs')
  directory = tempfile.mkdtemp(prefix='bench_integrity_')
  try:
    bench_checksums(args.n_latents, args.d_model, directory, args.repeats)
    bench_store(args.rows, args.d_model, directory, args.repeats)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  print(f'load average {open("/proc/loadavg").read().split()[:3]}')
  return 0


if __name__ == '__main__':
  cli.run_main(main)
