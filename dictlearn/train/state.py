"""Train state: built abstractly, created directly in its shardings.

The state is a plain dict (so orbax saves and restores it without custom nodes):

    params      SAE parameters (logical axes from the architecture)
    buffers     non-trainable SAE state (batchtopk's inference threshold)
    opt_state   optax state; its parameter-shaped parts shard like the parameters
    step        int32 scalar: optimisation steps taken
    stats       running latent statistics:
                  steps_since_fired int32 [n_latents]
                  fire_count        float32 [n_latents], tokens fired in the current window
                  window_tokens     float32 scalar, tokens seen in the current window
                  nonfinite_step    int32 scalar, first step with a non-finite metric (-1: none)
                  nonfinite_mask    int32 scalar, which metrics (bits in sorted-name order)
"""
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from dictlearn import sharding as sharding_lib
from dictlearn.sae.base import SparseAutoencoder


def init_state(sae: SparseAutoencoder, tx: optax.GradientTransformation, seed: int) -> dict:
  """A fresh train state (call under jit, or through `jax.eval_shape`)."""
  # The same key as when the state also held an rng (the step never drew from it):
  # a seed still gives the parameters it gave.
  init_key, _ = jax.random.split(jax.random.key(seed))
  params, buffers = sae.init(init_key)
  n = sae.n_latents
  return {
      'params': params,
      'buffers': buffers,
      'opt_state': tx.init(params),
      'step': jnp.zeros([], jnp.int32),
      'stats': {
          'steps_since_fired': jnp.zeros([n], jnp.int32),
          'fire_count': jnp.zeros([n], jnp.float32),
          'window_tokens': jnp.zeros([], jnp.float32),
          'nonfinite_step': jnp.full([], -1, jnp.int32),
          'nonfinite_mask': jnp.zeros([], jnp.int32),
      },
  }


def state_logical_axes(sae: SparseAutoencoder, tx: optax.GradientTransformation,
                       abstract_state: dict) -> dict:
  """Logical axes of every leaf of the state, derived from the parameters' axes.

  The optimizer state's parameter-shaped parts take the parameters' axes via
  `optax.tree_map_params`; everything else (counts, scalars) is replicated.
  """
  param_axes, buffer_axes = sae.logical_axes()
  replicate = lambda leaf: (None,) * len(leaf.shape)
  opt_axes = optax.tree_map_params(
      tx, lambda _, axes: axes, abstract_state['opt_state'], param_axes,
      transform_non_params=replicate, is_leaf=sharding_lib.is_logical_axes)
  return {
      'params': param_axes,
      'buffers': buffer_axes,
      'opt_state': opt_axes,
      'step': (),
      'stats': {
          'steps_since_fired': ('latent',),
          'fire_count': ('latent',),
          'window_tokens': (),
          'nonfinite_step': (),
          'nonfinite_mask': (),
      },
  }


def state_shardings(sae: SparseAutoencoder, tx: optax.GradientTransformation, seed: int,
                    mesh: Mesh, rules) -> tuple[dict, dict]:
  """Returns (abstract_state, shardings): shapes from `jax.eval_shape`, shardings from rules."""
  abstract = jax.eval_shape(lambda: init_state(sae, tx, seed))
  axes = state_logical_axes(sae, tx, abstract)
  shardings = sharding_lib.logical_shardings(mesh, axes, rules)
  return abstract, shardings


def create_state(sae: SparseAutoencoder, tx: optax.GradientTransformation, seed: int,
                 shardings: dict) -> dict:
  """Creates the state directly in its shardings (no host copy of the whole state)."""
  return jax.jit(lambda: init_state(sae, tx, seed), out_shardings=shardings)()


def abstract_with_shardings(abstract: dict, shardings: dict) -> dict:
  """ShapeDtypeStructs carrying shardings: the restore target of a checkpoint."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def per_device_bytes(abstract: dict, shardings: dict) -> int:
  """Bytes of the state on its most loaded device (every leaf's shard there)."""
  total = {}
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    itemsize = jnp.dtype(leaf.dtype).itemsize
    for device, index in sharding.devices_indices_map(tuple(leaf.shape)).items():
      shape = [len(range(*i.indices(n))) for i, n in zip(index, leaf.shape)]
      total[device] = total.get(device, 0) + math.prod(shape) * itemsize
  return max(total.values(), default=0)
