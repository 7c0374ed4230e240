"""dictlearn's exports read by the real sae_lens and sparsify, on the same raw activations.

    python tools/check_interop.py --store STORE --scratch DIR [--workdir RUN ...]
        [--peers_python /work/peers-venv/bin/python] [--rows 2048] [--train_steps 200]

Trains a small SAE of every architecture on STORE (unless --train_steps 0), adds
the runs given by --workdir, exports each to SAELens (and the TopK ones to sparsify)
with `dictlearn.interop`, writes the store's last --rows rows (raw, unscaled) and
dictlearn's reconstructions of them (`sae.reconstruct(x * data_scale) / data_scale`,
as the CE splice computes them) as .npy, and runs tools/check_saelens_format.py and
tools/check_sparsify_format.py with the peers' python on them. Prints one JSON line
per check: the max absolute difference of the reconstructions, the largest
|reconstruction|, and how many rows chose other latents.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dictlearn import cli
from dictlearn.data import store as store_lib
from dictlearn.interop import common
from dictlearn.interop import saelens
from dictlearn.interop import sparsify
from dictlearn.sae import make_sae
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train.trainer import train_and_evaluate

TOOLS = os.path.dirname(os.path.abspath(__file__))


def train_small(store: str, scratch: str, steps: int) -> list[str]:
  """A small SAE of every architecture on `store` (skipped where already trained)."""
  workdirs = []
  for arch in ('relu_l1', 'topk', 'batchtopk', 'jumprelu'):
    c = cli.load_config_file(os.path.join(cli.EXPERIMENTS_DIR, 'base.py'))
    c.unlock()
    c.data.store, c.sae.architecture = store, arch
    c.sae.n_latents, c.sae.k, c.sae.aux_k = 1024, 16, 128
    c.sae.jumprelu_threshold_init, c.sae.jumprelu_bandwidth = 0.5, 0.05
    c.train.batch_size, c.train.num_steps, c.train.eval_batches = 512, steps, 1
    c.train.checkpoint_every, c.optim.warmup_steps = steps, min(50, steps)
    workdir = os.path.join(scratch, 'train', arch)
    if ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(workdir)) != steps:
      train_and_evaluate(c, workdir)
    workdirs.append(workdir)
  return workdirs


def reference(workdir: str, rows: int, out: str) -> tuple[str, str]:
  """Writes inputs.npy (raw held-out rows) and expected.npy / expected_codes.npy."""
  snap = common.read_snapshot(workdir)
  reader = store_lib.StoreReader(snap.store)
  x = np.asarray(reader.read_rows(reader.n_rows - rows, reader.n_rows), np.float32)
  sae = make_sae(ml_collections.ConfigDict(snap.config['sae']), snap.run_info['d_model'])
  scale = np.float32(snap.run_info['data_scale'])
  params, buffers = jax.tree.map(jnp.asarray, (snap.params, snap.buffers))
  expected = np.asarray(jax.jit(sae.reconstruct)(params, buffers, x * scale)) / scale
  codes = np.asarray(jax.jit(sae.encode)(params, buffers, x * scale))
  os.makedirs(out, exist_ok=True)
  paths = os.path.join(out, 'inputs.npy'), os.path.join(out, 'expected.npy')
  np.save(paths[0], x)
  np.save(paths[1], expected)
  np.save(os.path.join(out, 'expected_codes.npy'), codes)
  return paths


def peers_check(peers_python: str, script: str, sae_dir: str, inputs: str, expected: str):
  env = dict(os.environ, SPARSIFY_DISABLE_TRITON='1')
  done = subprocess.run([peers_python, os.path.join(TOOLS, script), 'check', sae_dir, inputs,
                         expected], capture_output=True, text=True, env=env, check=False)
  if done.returncode:
    raise RuntimeError(f'{script} failed on {sae_dir}:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = cli.ArgumentParser(prog=f'python tools/{os.path.basename(__file__)}', description=__doc__)
  parser.add_argument('--store', required=True, help='activation store the SAEs read')
  parser.add_argument('--scratch', required=True, help='directory for runs and exports')
  parser.add_argument('--workdir', action='append', default=[], help='existing run(s) to check')
  parser.add_argument('--peers_python', default='/work/peers-venv/bin/python')
  parser.add_argument('--rows', type=int, default=2048)
  parser.add_argument('--train_steps', type=int, default=200)
  return cli.run_tool(_main, parser, argv)


def _main(args) -> int:
  workdirs = list(args.workdir)
  if args.train_steps:
    workdirs += train_small(args.store, args.scratch, args.train_steps)
  for i, workdir in enumerate(workdirs):
    arch = common.read_snapshot(workdir).architecture
    tag = f'{i}_{arch}'
    inputs, expected = reference(workdir, args.rows, os.path.join(args.scratch, tag))
    exports = [('saelens', 'check_saelens_format.py', saelens.export)]
    if arch == 'topk':
      exports.append(('sparsify', 'check_sparsify_format.py', sparsify.export))
    for name, script, export in exports:
      out = os.path.join(args.scratch, tag, name)
      if not os.path.exists(out):
        export(workdir, out)
      result = peers_check(args.peers_python, script, out, inputs, expected)
      print(json.dumps({'workdir': workdir, 'architecture': arch, 'format': name, **result}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
