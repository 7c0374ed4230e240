"""Memory of large dictionaries at a small size: sharded state, no dense [B, n] buffer,
optimizer moments stored in bfloat16 (tools/bench_memory.py runs the full size)."""
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dictlearn import sharding as sharding_lib
from dictlearn.sae import make_sae
from dictlearn.train import schedules
from dictlearn.train import state as state_lib
from dictlearn.train.trainer import make_train_step
from experiments import base

D = 16


def _config(n_latents, state_dtype, mesh_shape, block_size=0, batch=64):
  c = base.get_config()
  c.unlock()
  c.sae.architecture = 'topk'
  c.sae.n_latents = n_latents
  c.sae.k = 8
  c.sae.aux_k = 16
  c.sae.encoder_block_size = block_size
  c.optim.state_dtype = state_dtype
  c.train.batch_size = batch
  c.mesh.shape = mesh_shape
  c.lock()
  return c


def _build(config):
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axis_names)
  sae = make_sae(config.sae, D)
  tx = schedules.make_optimizer(config.optim, config.train.num_steps)
  abstract, shardings = state_lib.state_shardings(sae, tx, config.seed, mesh,
                                                  config.mesh.logical_axis_rules)
  return mesh, sae, tx, abstract, shardings


def _per_device_bytes(tree):
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  return per_device


@pytest.mark.parametrize('state_dtype', ['float32', 'bfloat16'])
def test_latent_sharded_state_is_an_eighth_per_device(state_dtype):
  n = 4096
  config = _config(n, state_dtype, (1, 8))
  _, sae, tx, _, shardings = _build(config)
  state = state_lib.create_state(sae, tx, config.seed, shardings)
  for part in ('params', 'opt_state'):
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state[part]))
    per_device = _per_device_bytes(state[part])
    assert len(per_device) == 8
    # Everything but b_dec (d_model floats, replicated) and Adam's step count
    # splits along the latents.
    replicated = sum(leaf.nbytes for leaf in jax.tree.leaves(state[part])
                     if len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated)
    assert replicated <= 2 * D * 4 + 8
    for nbytes in per_device.values():
      assert nbytes == (total - replicated) // 8 + replicated
  itemsize = jnp.dtype(state_dtype).itemsize
  assert sum(leaf.nbytes for leaf in jax.tree.leaves(state['opt_state'])) >= 2 * 2 * n * D * itemsize


def test_blocked_topk_step_has_no_dense_batch_by_latents_buffer():
  # Latents blocked by 4096 out of 65536, AuxK on: no buffer of the step may be
  # the size of a dense [batch, n_latents] float32 matrix.
  n, batch = 65536, 256
  config = _config(n, 'bfloat16', (1, 1), block_size=4096, batch=batch)
  mesh, sae, tx, abstract, shardings = _build(config)
  step = jax.jit(make_train_step(sae, tx, config), donate_argnums=0)
  compiled = step.lower(abstract, jax.ShapeDtypeStruct((batch, D), jnp.float32)).compile()
  dense = batch * n
  largest = max(math.prod(int(v) for v in dims.split(',') if v)
                for dims in re.findall(r'[a-z0-9]+\[([0-9,]*)\]', compiled.as_text()))
  assert largest < dense // 4, (largest, dense)
  assert compiled.memory_analysis().temp_size_in_bytes < 4 * dense
  # And it runs: a few steps with dead latents forced, so AuxK takes part.
  state = state_lib.create_state(sae, tx, config.seed, shardings)
  state['stats']['steps_since_fired'] = jnp.full((n,), 10 ** 6, jnp.int32)
  x = jax.random.normal(jax.random.key(0), (batch, D))
  for _ in range(2):
    state, metrics = step(state, x)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['aux_k']) > 0


def test_adam_moments_in_bfloat16_follow_float32_adam():
  # The bfloat16-stored moments give (nearly) optax's float32 Adam trajectory.
  params = {'w': jax.random.normal(jax.random.key(0), (64, 8))}
  target = jax.random.normal(jax.random.key(1), (64, 8))
  loss = lambda p: jnp.sum((p['w'] - target) ** 2)
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    tx = optax.chain(schedules.scale_by_adam_stored_as(dtype, 0.9, 0.999, 1e-8),
                     optax.scale_by_learning_rate(1e-2))
    p, s = params, tx.init(params)
    assert s[0].mu['w'].dtype == jnp.dtype(dtype) and s[0].nu['w'].dtype == jnp.dtype(dtype)
    for _ in range(50):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      p = optax.apply_updates(p, u)
    runs[dtype] = p['w']
  tx = optax.adam(1e-2)
  p, s = params, tx.init(params)
  for _ in range(50):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, u)
  np.testing.assert_allclose(runs['float32'], p['w'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(runs['bfloat16'], p['w'], atol=2e-2)
  assert float(loss({'w': runs['bfloat16']})) < 0.7 * float(loss(params))


HOST_MEMORY = r'''
import resource
from dictlearn import host_memory

def rss_mib():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2**20

assert host_memory.keep_freed_memory()
blocks = [bytearray(1 << 20) for _ in range(300)]  # 300 MiB of 1 MiB blocks, touched
del blocks
kept = rss_mib()
assert host_memory.release_freed_memory()
print(kept, rss_mib())
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_memory_is_kept_then_released():
  """keep_freed_memory keeps freed blocks resident (the next step reuses them);
  release_freed_memory gives them back (tools/bench_train.py between jobs)."""
  out = subprocess.run([sys.executable, '-c', HOST_MEMORY], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  kept, released = (float(v) for v in out.stdout.split())
  assert kept > 300 and released < kept - 250, (kept, released)
