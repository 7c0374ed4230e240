"""Mesh from config, logical axis names -> mesh shardings, host batch -> global array.

Sharding is declared once, as data: the config holds the mesh shape, the mesh
axis names and the logical-axis rules; parameters carry logical axis names
(`('latent', 'embed')` etc.), and everything else is derived here.
"""
from collections.abc import Sequence
import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np


def make_mesh(shape: Sequence[int], axis_names: Sequence[str],
              devices=None) -> Mesh:
  """Builds a device mesh.

  Args:
    shape: mesh shape, one entry per axis name; one entry may be -1, meaning
      all the devices the other axes leave.
    axis_names: mesh axis names, e.g. ('data', 'model').
    devices: devices to use (default: all of `jax.devices()`, in order). When
      the mesh needs fewer devices than there are, the first ones are used.

  Returns:
    The mesh.

  Raises:
    ValueError: the shape does not fit the devices or the axis names.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in shape]
  if len(shape) != len(axis_names):
    raise ValueError(f'mesh.shape {tuple(shape)} has {len(shape)} entries but '
                     f'mesh.axis_names {tuple(axis_names)} has {len(axis_names)}')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh.shape {tuple(shape)}: at most one entry may be -1')
  known = math.prod(s for s in shape if s != -1)
  if known <= 0 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh.shape {tuple(shape)}: entries must be positive or -1')
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'mesh.shape {tuple(shape)}: {len(devices)} devices do not '
                       f'divide by {known}')
    shape[shape.index(-1)] = len(devices) // known
  n = math.prod(shape)
  if n > len(devices):
    where = (f' ({jax.process_count()} processes with {jax.local_device_count()} devices each)'
             if jax.process_count() > 1 else '')
    raise ValueError(f'mesh.shape {tuple(shape)} needs {n} devices; '
                     f'{len(devices)} are available{where}')
  return Mesh(np.asarray(devices[:n], dtype=object).reshape(shape), tuple(axis_names))


def logical_to_spec(logical_axes: Sequence[str | None], rules) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec by the (logical, mesh) rules.

  Unknown logical names and `None` map to no mesh axis (replicated).
  """
  table = dict((logical, mesh_axis) for logical, mesh_axis in rules)
  return PartitionSpec(*(table.get(name) if name is not None else None
                         for name in logical_axes))


def is_logical_axes(x) -> bool:
  """True for a leaf of a logical-axes tree: a plain tuple of axis names (or None)."""
  return type(x) is tuple and all(a is None or isinstance(a, str) for a in x)


def logical_shardings(mesh: Mesh, logical_tree, rules):
  """A tree of logical axis tuples -> a tree of NamedShardings on `mesh`."""
  return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)),
                      logical_tree, is_leaf=is_logical_axes)


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a [batch, embed] activation batch."""
  return NamedSharding(mesh, logical_to_spec(('batch', 'embed'), rules))


def axis_size(mesh: Mesh, rules, logical: str) -> int:
  """Number of shards the logical axis is split into on `mesh`."""
  mesh_axis = dict(rules).get(logical)
  if mesh_axis is None:
    return 1
  names = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis)
  return math.prod(mesh.shape[a] for a in names)
