"""Several processes, one run: JAX's multi-controller runtime, started from the config.

Every host runs the same command. `initialize(config.distributed)` (called by
`dictlearn.cli` before a config-driven command's main, so before any device is
touched) calls `jax.distributed.initialize` when the run spans processes:

    coordinator_address, num_processes, process_id set   -> used as given
    initialize = 'always' (TPU pod slices)                  -> JAX detects the rest
    initialize = 'auto' and the environment names a multi-process launch
      (SLURM `srun` with more than one task, Open MPI, JAX_COORDINATOR_ADDRESS)
                                                          -> JAX detects the rest
    otherwise                                             -> one process; nothing to do

After it, `jax.devices()` lists every process's devices, a mesh spans them all,
and `jax.process_index()` tells the processes apart. Nothing here coordinates
hosts by itself: barriers and the agreement on a stop are JAX collectives over
the mesh's devices (`jax.experimental.multihost_utils`), and when a process dies
JAX's coordination service stops the others after `heartbeat_timeout_s`.
"""
import logging
import math
import os
import socket
import time

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

log = logging.getLogger(__name__)

INITIALIZE_MODES = ('auto', 'always', 'never')


class CoordinatorError(ConnectionError):
  """The processes of a run could not find each other."""


def launched_multi_process() -> bool:
  """Whether the environment names a launch of more than one process (SLURM srun with
  several tasks, Open MPI, or JAX_COORDINATOR_ADDRESS)."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if int(env.get('SLURM_NTASKS', env.get('SLURM_STEP_NUM_TASKS', '1')) or 1) > 1 and (
      'SLURM_PROCID' in env):
    return True
  return int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1


def _explicit(config: ml_collections.ConfigDict) -> dict:
  """The fields set in the config, as `jax.distributed.initialize` arguments."""
  out = {}
  if config.coordinator_address:
    out['coordinator_address'] = config.coordinator_address
  if config.num_processes > 0:
    out['num_processes'] = config.num_processes
  if config.process_id >= 0:
    out['process_id'] = config.process_id
  return out


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the field, for a `distributed` section that cannot work."""
  if config.initialize not in INITIALIZE_MODES:
    raise ValueError(f'config.distributed.initialize={config.initialize!r}: expected one of '
                     f'{INITIALIZE_MODES}')
  if config.num_processes == 0 or config.num_processes < -1:
    raise ValueError(f'config.distributed.num_processes={config.num_processes}: expected a '
                     'positive count, or -1 to take it from the environment')
  if config.num_processes > 0 and not -1 <= config.process_id < config.num_processes:
    raise ValueError(f'config.distributed.process_id={config.process_id} is not a process of '
                     f'num_processes={config.num_processes} (expected 0 to '
                     f'{config.num_processes - 1}, or -1 from the environment)')
  for name in ('initialization_timeout_s', 'heartbeat_timeout_s', 'shutdown_timeout_s'):
    if config[name] < 1:
      raise ValueError(f'config.distributed.{name}={config[name]}: expected at least 1 second')
  given = _explicit(config)
  if (config.initialize == 'auto' and 0 < len(given) < 3 and not launched_multi_process()):
    missing = [n for n in ('coordinator_address', 'num_processes', 'process_id') if n not in given]
    raise ValueError(f'config.distributed sets {sorted(given)} but not {missing}: outside a '
                     'SLURM, Open MPI or TPU launch all three are needed (the same address and '
                     'count on every process, process_id 0 on the coordinator)')


def wanted(config: ml_collections.ConfigDict) -> bool:
  """Whether `initialize` would start JAX's distributed runtime for this config."""
  if config.initialize == 'never':
    return False
  if config.initialize == 'always' or _explicit(config):
    return True
  return launched_multi_process()


def initialize(config: ml_collections.ConfigDict) -> bool:
  """Starts JAX's distributed runtime when the config or the environment asks for it.

  Call before anything touches a device. A second call (a test, a command that
  runs twice in one process) is a no-op.

  Args:
    config: the `distributed` section of an experiment config (experiments/base.py).

  Returns:
    True when this process is part of a multi-process run.

  Raises:
    ValueError: a bad section (see `check_config`).
    CoordinatorError: the coordinator did not answer within the initialization
      timeout; the message names the address, this process and the timeout.
  """
  check_config(config)
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if not wanted(config):
    return False
  # Collectives between processes on the CPU go through gloo (the default in this
  # jax; said here so that a changed default does not silently break CPU runs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  args = _explicit(config)
  where = args.get('coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS',
                                                        'from the environment'))
  who = (f"process {args.get('process_id', '?')} of {args.get('num_processes', '?')}")
  log.info('jax.distributed.initialize: coordinator %s, %s', where, who)
  if args.get('process_id', -1) != 0 and ':' in where:
    wait_for_coordinator(where, config.initialization_timeout_s, who)
  try:
    jax.distributed.initialize(
        **args, initialization_timeout=int(config.initialization_timeout_s),
        heartbeat_timeout_seconds=int(config.heartbeat_timeout_s),
        shutdown_timeout_seconds=int(config.shutdown_timeout_s))
  except (RuntimeError, ValueError) as e:
    raise ValueError(f'jax.distributed.initialize failed for coordinator {where} as {who}: '
                     f'{str(e).splitlines()[0][:300]}') from e
  log.info('process %d of %d: %d local devices of %d', jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def wait_for_coordinator(address: str, timeout_s: float, who: str) -> None:
  """Waits until the coordinator's port accepts a connection.

  JAX's client, when it cannot reach the coordinator, ends the process from C++
  with a message about another task having died; this check turns the common
  case (a wrong address, process 0 not started) into an error that says so.

  Raises:
    CoordinatorError: naming the address, this process and the timeout.
  """
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise CoordinatorError(
            f'could not reach the coordinator at {address} as {who} within '
            f'distributed.initialization_timeout_s={timeout_s} s ({e}): start process 0 (it '
            'hosts the coordinator) with the same coordinator_address and num_processes, and '
            'check the host name and that the port is open') from None
      time.sleep(0.5)


def process_count() -> int:
  """Processes in the run (1 when single-process)."""
  return jax.process_count()


def process_index() -> int:
  """This process's index (0 when single-process)."""
  return jax.process_index()


def is_primary() -> bool:
  """Whether this process writes what a run writes once (metrics, manifests, summaries)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reached the barrier `name` (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any (a collective: all must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
  return bool(np.any(flags))


def to_host(x) -> np.ndarray:
  """A global array, whole, as numpy on every process (a collective when it spans processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def check_mesh(mesh) -> None:
  """A multi-process mesh must hold every device of every process, each process's
  devices forming a block of the data axis (so each reads a contiguous slice).

  Raises:
    ValueError: naming the mesh, the device count and the process count.
  """
  if jax.process_count() == 1:
    return
  size = math.prod(mesh.shape.values())
  if size != jax.device_count():
    raise ValueError(
        f'mesh {dict(mesh.shape)} uses {size} of the {jax.device_count()} devices of '
        f'{jax.process_count()} processes ({jax.local_device_count()} each): a multi-process '
        'mesh must span every device of every process (set mesh.shape to a product of '
        f'{jax.device_count()}, or -1 on one axis)')
