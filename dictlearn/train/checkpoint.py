"""orbax checkpoints of the whole train state, with the config and run facts beside it.

Layout: `workdir/checkpoints/<step>/{state, config, run}`:
    state   the whole train state (params, buffers, opt_state, step, rng, stats)
    config  the ConfigDict the run was started with, as JSON
    run     facts derived at start that a resume must reuse, as JSON (data_scale,
            d_model, and the store: `run_record`; an SAE imported from another
            library without a store has store None and names its 'site' and 'model')

Order on start (`train_and_evaluate`): the latest checkpoint in the workdir; else
`config.train.init_from` (a checkpoint directory of another run: its state is
the starting point, its step kept); else a fresh state. The restore target is the
abstract state of *this* run with *this* mesh's shardings, so a checkpoint saved on
one mesh shape restores onto another.
"""
import logging
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from dictlearn.train import state as state_lib


def _abs(path: str) -> str:
  return path if '://' in path else os.path.abspath(path)


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its checkpoints."""
  return os.path.join(_abs(workdir), 'checkpoints')


def run_directory(workdir: str) -> str:
  """The training run in `workdir`: itself, or the `sae/` run of a pipeline's directory.

  Raises:
    FileNotFoundError: neither holds checkpoints.
  """
  for candidate in (workdir, os.path.join(workdir, 'sae')):
    if '://' in candidate or os.path.isdir(checkpoint_dir(candidate)):
      return candidate
  raise FileNotFoundError(
      f'no checkpoints in {workdir!r}: expected {os.path.join(workdir, "checkpoints")} (a '
      f'training run) or {os.path.join(workdir, "sae", "checkpoints")} (a pipeline run)')


def run_record(store: str, workdir: str, *, d_model: int, data_scale: float) -> dict:
  """The `run` item: what a resume must reuse, with the store recorded portably.

  The store is kept twice: `store`, absolute (or its URL), and `store_from_workdir`,
  relative to the workdir (None for a URL). `recorded_store` tries the relative
  one first, so a workdir moved together with its store (synthetic data in
  `workdir/data`, the pipeline's `activations/` beside `sae/`) and a workdir
  moved away from a store that stayed put both still find it, from any current
  directory.
  """
  local = '://' not in store
  return {
      'store': os.path.abspath(store) if local else store,
      'store_from_workdir': os.path.relpath(os.path.abspath(store), _abs(workdir)) if local else None,
      'd_model': int(d_model),
      'data_scale': float(data_scale),
  }


def recorded_store(run_info: dict, workdir: str) -> str:
  """The store a run trained on (see `run_record`).

  Raises:
    FileNotFoundError: neither recorded path holds a store; the message names both.
    ValueError: the run has no store (an SAE imported without one).
  """
  if not run_info['store']:
    site = run_info.get('site') or 'the site the SAE reads'
    raise ValueError(
        f'the run in {workdir} has no activation store (an SAE imported from another '
        f'library without one); import it again with --store PATH, a store of {site} with '
        f'd_model={run_info["d_model"]}')
  relative = run_info.get('store_from_workdir')
  candidates = []
  if relative:
    candidates.append(os.path.normpath(os.path.join(_abs(workdir), relative)))
  candidates.append(run_info['store'])
  for path in candidates:
    if '://' in path or os.path.isdir(path):
      return path
  raise FileNotFoundError(
      f'the activation store of the run in {workdir} is gone: looked at '
      + ' and '.join(repr(c) for c in candidates)
      + ' (a workdir keeps the store path it was started with; move the store back, or '
      'start a new run with --config.data.store=PATH and train.init_from)')


def make_manager(directory: str, *, keep: int = 3, read_only: bool = False,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `directory` (keep-N retention, async saves)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save)
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'run': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(_abs(directory), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: dict, config_dict: dict,
         run_info: dict) -> None:
  """Starts an (async) save of the whole state plus config and run facts at `step`."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config_dict),
      run=ocp.args.JsonSave(run_info)), force=True)


def latest_step(directory: str) -> int | None:
  """The latest complete checkpoint step under `directory`, or None."""
  if not os.path.isdir(_abs(directory)) and '://' not in directory:
    return None
  manager = make_manager(directory, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def _check_arrays_match(manager: ocp.CheckpointManager, step: int, abstract_state: dict):
  """Raises ValueError, naming the arrays, when the checkpoint's parameters or buffers
  are not the ones this SAE has (another architecture, or an older dictlearn)."""
  saved = manager.item_metadata(step)['state'].tree
  problems = []
  for part in ('params', 'buffers'):
    have, want = set(saved.get(part) or {}), set(abstract_state[part])
    if have != want:
      problems.append(f"{part}: expected {sorted(want)}, the checkpoint has {sorted(have)}")
  if problems:
    raise ValueError(
        f'checkpoint step {step} in {manager.directory} does not match this SAE ('
        + '; '.join(problems) + '). It was written for another architecture or by a '
        'dictlearn whose state differs (BatchTopK added the buffer selection_floor); '
        'train from a fresh workdir, or point train.init_from at a matching checkpoint.')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: dict,
            shardings: dict) -> tuple[dict, dict, dict]:
  """Restores (state, config_dict, run_info) at `step` onto the given shardings.

  Raises:
    ValueError: when the checkpoint's parameters or buffers differ from this SAE's.
  """
  _check_arrays_match(manager, step, abstract_state)
  target = state_lib.abstract_with_shardings(abstract_state, shardings)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target),
      config=ocp.args.JsonRestore(),
      run=ocp.args.JsonRestore()))
  logging.info('restored checkpoint step %d from %s', step, manager.directory)
  return restored['state'], restored['config'], restored['run']


def read_metadata(directory: str, step: int | None = None) -> tuple[int, dict, dict]:
  """Reads (step, config_dict, run_info) of a checkpoint without its arrays.

  Raises:
    FileNotFoundError: no checkpoint (at that step) under `directory`.
  """
  manager = make_manager(directory, read_only=True)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint under {directory}')
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f'no checkpoint at step {step} under {directory}; '
                              f'steps present: {sorted(steps)}')
    restored = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore(), run=ocp.args.JsonRestore()))
    return step, restored['config'], restored['run']
  finally:
    manager.close()


def restore_arrays(directory: str, step: int | None = None) -> tuple[int, dict]:
  """Restores a checkpoint's state as it was saved, without rebuilding its run.

  For tools that read any checkpoint. One process whose first device can hold the
  whole state gets it there. Otherwise (several processes, or a state bigger than
  one device) every array is restored sharded over all devices, as it was saved
  (`restore_mesh`): nothing is gathered onto one device.

  Returns:
    (step, state).
  """
  manager = make_manager(directory, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {directory}')
    saved = manager.item_metadata(step)['state'].tree
    if jax.process_count() == 1 and _fits_one_device(saved, jax.devices()[0]):
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, saved)
    else:
      mesh = restore_mesh(saved, jax.devices())
      shardings = jax.tree.map(lambda m: _saved_spec_on(mesh, m), saved)
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                          saved, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return step, restored['state']
  finally:
    manager.close()


def restore_sae(directory: str, step: int | None, shardings: dict) -> tuple[int, dict, dict]:
  """Restores only a checkpoint's SAE parameters and buffers, onto `shardings`.

  For readers of a trained SAE (analysis, export): the optimizer state, two to
  three times the parameters' size, is never read.

  Args:
    directory: the checkpoint directory (`checkpoint_dir(workdir)`).
    step: checkpoint step, or None for the latest.
    shardings: {'params': {name: Sharding}, 'buffers': {name: Sharding}} for
      the arrays the checkpoint holds (names as `item_metadata` lists them).

  Returns:
    (step, params, buffers).

  Raises:
    FileNotFoundError: no checkpoint (at that step) under `directory`.
    ValueError: `shardings` names other arrays than the checkpoint holds.
  """
  handlers = {'state': ocp.PyTreeCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'run': ocp.JsonCheckpointHandler()}
  manager = ocp.CheckpointManager(_abs(directory), item_handlers=handlers,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = manager.all_steps()
    step = max(steps, default=None) if step is None else step
    if step is None or step not in steps:
      raise FileNotFoundError(f'no checkpoint at step {step} under {directory}; '
                              f'steps present: {sorted(steps)}')
    tree = manager.item_metadata(step)['state'].tree
    for part in ('params', 'buffers'):
      have, want = set(tree.get(part) or {}), set(shardings[part])
      if have != want:
        raise ValueError(f'checkpoint step {step} in {directory}: {part} are {sorted(have)}, '
                         f'expected {sorted(want)}')
    target = {part: {name: jax.ShapeDtypeStruct(tree[part][name].shape, tree[part][name].dtype,
                                                sharding=shardings[part][name])
                     for name in shardings[part]} for part in ('params', 'buffers')}
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))
    state = restored['state']
    return step, state['params'], state.get('buffers') or {}
  finally:
    manager.close()


def _fits_one_device(saved: dict, device) -> bool:
  limit = (device.memory_stats() or {}).get('bytes_limit')  # None on a CPU: host memory
  need = sum(math.prod(m.shape) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(saved))
  return limit is None or need <= limit


def _saved_mesh_of(meta):
  sharding = getattr(meta, 'sharding', None)
  if sharding is None or not hasattr(sharding, 'partition_spec'):
    return None
  return dict(zip(sharding.axis_names, (int(n) for n in sharding.shape)))


def restore_mesh(saved: dict, devices) -> jax.sharding.Mesh:
  """A mesh over `devices` with the axis names a checkpoint was saved with: its own
  shape when the device count matches, else every device on the axis its largest
  array was split over (the latent axis of an SAE)."""
  leaves = jax.tree.leaves(saved)
  largest = max(leaves, key=lambda m: math.prod(m.shape))
  shape = _saved_mesh_of(largest) or {'data': 1, 'model': 1}
  names = list(shape)
  if math.prod(shape.values()) != len(devices):
    spec = [a for a in getattr(largest.sharding, 'partition_spec', ()) or () if a]
    axis = spec[0] if spec and isinstance(spec[0], str) else names[-1]
    shape = {name: (len(devices) if name == axis else 1) for name in names}
  return jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(list(shape.values())),
                           tuple(names))


def _saved_spec_on(mesh, meta):
  """The saved partition spec on `mesh`; a dimension the mesh axis does not divide,
  or an axis the mesh lacks, is replicated."""
  spec = list(getattr(getattr(meta, 'sharding', None), 'partition_spec', None) or ())
  out = []
  for dim, axis in zip(meta.shape, spec + [None] * (len(meta.shape) - len(spec))):
    names = (axis,) if isinstance(axis, str) else tuple(axis or ())
    ok = names and all(n in mesh.shape for n in names) and (
        dim % math.prod(mesh.shape[n] for n in names) == 0)
    out.append(axis if ok else None)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*out))


def saved_mesh(directory: str, step: int) -> dict | None:
  """The mesh ({axis: size}) a checkpoint's parameters were saved on, or None."""
  manager = make_manager(directory, read_only=True)
  try:
    tree = manager.item_metadata(step)['state'].tree
  finally:
    manager.close()
  return _saved_mesh_of(next(iter(tree['params'].values())))


def saved_shardings(directory: str, step: int) -> dict:
  """Parameter name -> the sharding it was saved with (mesh shape and partition spec)."""
  manager = make_manager(directory, read_only=True)
  try:
    tree = manager.item_metadata(step)['state'].tree
  finally:
    manager.close()
  out = {}
  for name, meta in tree['params'].items():
    sharding = meta.sharding
    if hasattr(sharding, 'partition_spec'):
      mesh = dict(zip(sharding.axis_names, [int(s) for s in sharding.shape]))
      out[name] = f'mesh {mesh} spec {tuple(sharding.partition_spec)}'
    else:
      out[name] = str(sharding)
  return out
