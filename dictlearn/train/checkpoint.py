"""orbax checkpoints of the whole train state, with the config and run facts beside it.

Layout: `workdir/checkpoints/<step>/{state, config, run, checksums}`:
    state     the whole train state (params, buffers, opt_state, step, rng, stats)
    config    the ConfigDict the run was started with, as JSON
    run       facts derived at start that a resume must reuse, as JSON (data_scale,
              d_model, and the store: `run_record`; an SAE imported from another
              library without a store has store None and names its 'site' and 'model')
    checksums a fingerprint of every array of the state, computed on device at save
              time (`state_checksums`), as JSON; checked after every restore

Order on start (`train_and_evaluate`): the latest checkpoint in the workdir that
restores and verifies (`restore_latest_good`: a damaged newer one is moved to
`workdir/checkpoints_damaged/` with one warning); else `config.train.init_from` (a
checkpoint directory of another run: its state is the starting point, its step
kept); else a fresh state. The restore target is the abstract state of *this* run
with *this* mesh's shardings, so a checkpoint saved on one mesh shape restores onto
another.

What is verified on restore: orbax and TensorStore check the structure (the OCDBT
manifest and index, the array metadata, the lengths of what they read); they do not
checksum the array data, so a flipped byte would restore silently: the recorded
checksums catch it. A save that fails (a full disk) raises `CheckpointSaveError`;
orbax writes into a temporary directory and renames it when complete, so earlier
checkpoints are untouched and the partial one is removed by the next start.
"""
import glob
import logging
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dictlearn import logs
from dictlearn.train import state as state_lib

log = logging.getLogger(__name__)

DAMAGED_DIR = 'checkpoints_damaged'  # beside checkpoints/: checkpoints moved aside


class SaeMismatchError(ValueError):
  """A checkpoint holds another SAE's arrays (architecture, names, shapes or dtypes)."""


class CorruptCheckpointError(ValueError):
  """A checkpoint that cannot be restored, or whose state fails its recorded checksums."""


class CheckpointSaveError(OSError):
  """Saving a checkpoint failed (a full disk, a lost mount); earlier ones are intact."""


def first_line(error: BaseException, limit: int = 240) -> str:
  """`Type: message` of an exception, on one line, cut at `limit` characters."""
  return _one_line(type(error).__name__, str(error), limit)


def _one_line(type_name: str, text: str, limit: int) -> str:
  text = ' '.join(text.split()) or type_name
  return f'{type_name}: ' + (text if len(text) <= limit else text[:limit] + '...')


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
      enable_async_checkpointing=async_save,
      # A save killed or failed (a full disk) leaves <step>.orbax-checkpoint-tmp*: gone on start.
      cleanup_tmp_directories=not read_only)
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'run': ocp.JsonCheckpointHandler(), 'checksums': ocp.JsonCheckpointHandler()}
  _quiet_orbax_leftovers()
  return ocp.CheckpointManager(_abs(directory), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: dict, config_dict: dict,
         run_info: dict) -> None:
  """Starts an (async) save of the whole state plus config, run facts and checksums at `step`.

  Raises:
    CheckpointSaveError: this save, or the previous async one, failed.
  """
  checksums = {'algorithm': CHECKSUM_ALGORITHM, 'arrays': state_checksums(state)}
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config_dict),
        run=ocp.args.JsonSave(run_info),
        checksums=ocp.args.JsonSave(checksums)), force=True)
  except Exception as e:  # pylint: disable=broad-except  # orbax raises what its threads met
    raise _save_error(manager, step, e) from e


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for the async saves in flight.

  Raises:
    CheckpointSaveError: one of them failed.
  """
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, None, e) from e


def close(manager: ocp.CheckpointManager) -> None:
  """Closes a manager; after a failed save (already reported) its error is only logged."""
  try:
    manager.close()
  except Exception as e:  # pylint: disable=broad-except
    log.info('closing the checkpoint manager of %s: %s', manager.directory, first_line(e))


def _root_cause(error: BaseException) -> BaseException:
  """The OSError under a chain of wrapped exceptions, if any, else the last one."""
  chain = logs.exception_chain(error)
  return next((e for e in chain if isinstance(e, OSError) and e.errno), chain[-1])


def _save_error(manager, step, error) -> CheckpointSaveError:
  cause = _root_cause(error)
  reason = (os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno
            else first_line(cause))
  # TensorStore reports the OS error inside its message: [os_error_code='28'].
  code = re.search(r"os_error_code='?(\d+)", str(cause)) or re.search(
      r"os_error_code='?(\d+)", str(error))
  if code:
    reason = os.strerror(int(code.group(1)))
  try:
    manager.reload()
    kept = sorted(manager.all_steps())
  except Exception:  # pylint: disable=broad-except
    kept = []
  # An async save fails into the next call: its partial directory names its step.
  partial = [os.path.basename(p).split('.')[0] for p in
             glob.glob(os.path.join(str(manager.directory), '*.orbax-checkpoint-tmp*'))]
  partial = sorted(int(p) for p in partial if p.isdigit())
  step = partial[-1] if partial else step
  what = f'step {step}' if step is not None else '(the last one started)'
  then = ('once the cause is fixed (free some space), the same command resumes from there; '
          'the partial save is removed then')
  return CheckpointSaveError(
      f'saving checkpoint {what} in {manager.directory} failed: {reason}. '
      + (f'The earlier checkpoints are intact (latest: step {kept[-1]}): {then}' if kept else
         f'There is no earlier checkpoint: {then.replace("resumes from there", "starts again")}'))


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
  """Raises SaeMismatchError, naming the arrays, when the checkpoint's parameters or
  buffers are not the ones this SAE has (another architecture, another size, or an
  older dictlearn)."""
  saved = manager.item_metadata(step)['state'].tree
  problems = []
  for part in ('params', 'buffers'):
    have, want = set(saved.get(part) or {}), set(abstract_state[part])
    if have != want:
      problems.append(f"{part}: expected {sorted(want)}, the checkpoint has {sorted(have)}")
      continue
    for name in sorted(want):
      a, b = saved[part][name], abstract_state[part][name]
      if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
        problems.append(f'{part}.{name}: this SAE has {np.dtype(b.dtype).name}{list(b.shape)}, '
                        f'the checkpoint {np.dtype(a.dtype).name}{list(a.shape)}')
  if problems:
    raise SaeMismatchError(
        f'checkpoint step {step} in {manager.directory} does not match this SAE ('
        + '; '.join(problems) + '). It was written for another architecture or size, or by a '
        'dictlearn whose state differs (BatchTopK added the buffer selection_floor); '
        'train from a fresh workdir, or point train.init_from at a matching checkpoint.')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: dict,
            shardings: dict) -> tuple[dict, dict, dict]:
  """Restores (state, config_dict, run_info) at `step` onto the given shardings, and
  checks the state against the checksums recorded when it was saved.

  Raises:
    SaeMismatchError: the checkpoint's parameters or buffers differ from this SAE's.
    CorruptCheckpointError: the restored state differs from the one saved.
    Exception: whatever orbax raises for a checkpoint it cannot read.
  """
  _check_arrays_match(manager, step, abstract_state)
  target = state_lib.abstract_with_shardings(abstract_state, shardings)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target),
      config=ocp.args.JsonRestore(),
      run=ocp.args.JsonRestore()))
  verify_checksums(manager, step, restored['state'])
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
    verify_checksums(manager, step, restored['state'])
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
    CorruptCheckpointError: the arrays differ from those saved (their checksums).
  """
  handlers = {'state': ocp.PyTreeCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'run': ocp.JsonCheckpointHandler(), 'checksums': ocp.JsonCheckpointHandler()}
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
    verify_checksums(manager, step, {'params': state['params'],
                                     'buffers': state.get('buffers') or {}})
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


# ---------------------------------------------------------------------------
# Checksums of the state
# ---------------------------------------------------------------------------

def _fingerprint(x: jax.Array) -> jax.Array:
  """A uint32 sum over the bits of `x`, each element weighted by an odd function of its
  position: a change of any one element always changes it, and of several, all but
  about 2^-32 of the time. Exact integer arithmetic, so the result does not depend on
  the sharding or the order of the reduction. (XLA's CPU backend reduces integers
  several times slower than floats: about 0.5 s per 100 MB on a busy 2-core machine,
  paid once per checkpoint, and a save of the same state takes longer.)"""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}'))
    if x.dtype.itemsize == 8:
      bits = bits ^ (bits >> 32)
    u = bits.astype(jnp.uint32)
  index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
  return jnp.sum(u * (index * 2 + 1), dtype=jnp.uint32)


CHECKSUM_ALGORITHM = 'uint32 sum of bits x (2 * index + 1)'  # what `_fingerprint` computes
_fingerprints = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))


def state_checksums(state: dict) -> dict:
  """{'params.W_enc': 'float32[16, 128]:<8 hex digits>', ...} for every array of the state,
  computed on the devices that hold it (no host copy of the state)."""
  sums = jax.tree_util.tree_leaves(jax.device_get(_fingerprints(state)))
  out = {}
  for (path, value), digest in zip(jax.tree_util.tree_leaves_with_path(state), sums):
    name = jax.tree_util.keystr(path, simple=True, separator='.')
    dtype = (jax.random.key_data(value).dtype
             if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) else value.dtype)
    out[name] = f'{np.dtype(dtype).name}{list(value.shape)}:{int(digest):08x}'
  return out


def verify_checksums(manager: ocp.CheckpointManager, step: int, state: dict) -> None:
  """Checks restored arrays (all of the state, or part of it) against the checksums
  recorded at save time; a checkpoint saved before they were recorded passes.

  Raises:
    CorruptCheckpointError: naming the arrays that differ.
  """
  path = os.path.join(str(manager.directory), str(step), 'checksums')
  if '://' not in path and not os.path.isdir(path):
    logging.info('checkpoint step %d in %s has no checksums (saved by an older dictlearn)',
                 step, manager.directory)
    return
  recorded = manager.restore(step, args=ocp.args.Composite(
      checksums=ocp.args.JsonRestore()))['checksums']
  if recorded.get('algorithm') != CHECKSUM_ALGORITHM:
    logging.info('checkpoint step %d in %s: checksums of another kind (%s), not checked',
                 step, manager.directory, recorded.get('algorithm'))
    return
  recorded = recorded['arrays']
  actual = state_checksums(state)
  bad = [name for name, value in actual.items() if recorded.get(name) != value]
  if bad:
    raise CorruptCheckpointError(
        f'checkpoint step {step} in {manager.directory}: the restored state differs from the '
        f'one saved ({", ".join(bad[:6])}{", ..." if len(bad) > 6 else ""} fail their checksums)'
        ': its files were changed after the save')


# ---------------------------------------------------------------------------
# Falling back past a damaged checkpoint
# ---------------------------------------------------------------------------

def read_newest_metadata(manager: ocp.CheckpointManager) -> tuple[int, dict, dict] | None:
  """(step, config_dict, run_info) of the newest checkpoint whose config and run facts
  read (a damaged newer one is dealt with by `restore_latest_good`), or None for none.

  Raises:
    CorruptCheckpointError: there are checkpoints and none of them reads.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore(), run=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f'step {step}: {first_line(e, 160)}')
      continue
    return step, restored['config'], restored['run']
  if failures:
    raise CorruptCheckpointError(
        f'no checkpoint in {manager.directory} can be read ({"; ".join(failures)}). They are '
        'left as they are for inspection; move checkpoints/ away to start the run afresh')
  return None


def damage_reason(manager: ocp.CheckpointManager, step: int, error: BaseException) -> str:
  """Why checkpoint `step` did not restore, on one line: the innermost cause (TensorStore's
  message names the file and what was wrong with it), without the spec dumps."""
  directory = os.path.join(str(manager.directory), str(step))
  if '://' not in directory and os.path.isdir(directory) and not os.listdir(directory):
    return 'its step directory is empty'
  cause = logs.exception_chain(error)[-1]
  text = str(cause)
  for noise in (' [tensorstore_spec=', ' See full TensorStore details'):
    text = text.split(noise)[0]
  return _one_line(type(cause).__name__, text, 300)


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoint `step` out of the manager's directory, into DAMAGED_DIR beside it
  (kept for inspection, never deleted); returns where it went."""
  source = os.path.join(str(manager.directory), str(step))
  parent = os.path.dirname(str(manager.directory).rstrip('/'))
  target = os.path.join(parent, DAMAGED_DIR, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(os.path.dirname(target), exist_ok=True)
  os.rename(source, target)
  return target


def _quiet_orbax_leftovers() -> None:
  """After a failed restore or save, orbax's other reads and writes of that checkpoint
  fail or complete late, into its closed event loop, and Python prints a traceback for
  each (as unraisable exceptions: 'Exception ignored in <coroutine ...>', 'Event loop
  is closed'). The failure itself is reported once: log these instead. Installed once
  (by `make_manager`); anything else goes on to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, '_dictlearn_quiet', False):
    return

  def from_failed_restore(unraisable) -> bool:
    if isinstance(unraisable.exc_value, RuntimeError) and 'Event loop is closed' in str(
        unraisable.exc_value):
      return True
    code = getattr(unraisable.object, 'cr_code', None)
    return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename

  def hook(unraisable):
    if from_failed_restore(unraisable):
      log.info('after a failed checkpoint restore, ignored: %s',
               first_line(unraisable.exc_value))
      return
    previous(unraisable)

  hook._dictlearn_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state: dict, shardings: dict,
                        *, move_damaged: bool = True) -> tuple[int, dict, dict, dict]:
  """Restores the newest checkpoint that restores and verifies.

  Every newer one that fails (a truncated or missing file, unreadable metadata, an
  empty step directory, a checksum mismatch) gets one warning naming it and why, and
  with `move_damaged` is moved aside (`move_aside`) so that the run can save that
  step again.

  Returns:
    (step, state, config_dict, run_info).

  Raises:
    SaeMismatchError: a checkpoint of another SAE (not damage: nothing is moved).
    CorruptCheckpointError: no checkpoint restores (nothing is moved).
    FileNotFoundError: there is no checkpoint.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, config, run_info = restore(manager, step, abstract_state, shardings)
    except SaeMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # any damage: try an older one
      log.info('checkpoint step %d in %s does not restore', step, manager.directory,
               exc_info=True)
      failures.append((step, damage_reason(manager, step, e)))
      continue
    for bad, reason in failures:
      where = 'left in place'
      if move_damaged and '://' not in str(manager.directory) and jax.process_index() == 0:
        where = f'moved to {move_aside(manager, bad)}'
      log.warning('checkpoint step %d in %s is damaged and was skipped (%s); %s; resuming '
                  'from step %d', bad, manager.directory, reason, where, step)
    if failures:
      manager.reload()
    return step, state, config, run_info
  if not failures:
    raise FileNotFoundError(f'no checkpoint under {manager.directory}')
  raise CorruptCheckpointError(
      f'no checkpoint in {manager.directory} restores: '
      + '; '.join(f'step {step}: {reason}' for step, reason in failures)
      + '. They are left as they are for inspection; move checkpoints/ away to start afresh')
