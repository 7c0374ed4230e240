"""train_and_evaluate: the loop around one pure, jitted, sharded train step.

    state, metrics = train_step(state, batch)

The step takes the whole state (params, optimizer, step, rng, latent statistics)
and one global batch, and returns the next state; it is jitted once with explicit
in/out shardings and the state donated. Data position is a function of the step,
so resuming is restoring the state and replaying the loader from its step.
"""
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dictlearn import distributed
from dictlearn import logs
from dictlearn import sharding as sharding_lib
from dictlearn.data import loader as loader_lib
from dictlearn.data import store as store_lib
from dictlearn.data import synthetic
from dictlearn.sae import make_sae
from dictlearn.sae import sparse
from dictlearn.sae.base import SparseAutoencoder
from dictlearn.sae.evaluation import evaluate_reconstruction
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import checks
from dictlearn.train import metrics as metrics_lib
from dictlearn.train import schedules
from dictlearn.train import state as state_lib
from dictlearn.train import throughput

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
  """A training metric became NaN or infinite."""


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------

def dead_after_steps(config: ml_collections.ConfigDict) -> int:
  """Steps without firing after which a latent counts as dead."""
  return max(1, math.ceil(config.sae.dead_tokens_threshold / config.train.batch_size))


def update_latent_stats(stats: dict, fired: jax.Array, step: jax.Array, tokens: int,
                        log_every: int) -> dict:
  """Steps since each latent last fired, and firing counts over the log window."""
  new_window = (step % log_every) == 0
  fire_count = jnp.where(new_window, 0.0, stats['fire_count']) + fired
  window_tokens = jnp.where(new_window, 0.0, stats['window_tokens']) + tokens
  steps_since_fired = jnp.where(fired > 0, 0, stats['steps_since_fired'] + 1)
  return dict(stats, fire_count=fire_count, window_tokens=window_tokens,
              steps_since_fired=steps_since_fired)


def make_train_step(sae: SparseAutoencoder, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict):
  """Returns the pure `train_step(state, batch) -> (state, metrics)`."""
  num_steps = config.train.num_steps
  lr_schedule = schedules.learning_rate_schedule(config.optim, num_steps)
  sparsity = schedules.sparsity_schedule(config.sae, num_steps)
  dead_steps = dead_after_steps(config)
  dense_threshold = config.sae.dense_threshold
  log_every = config.train.log_every

  def train_step(state, batch):
    step = state['step']
    params, stats = state['params'], state['stats']
    coefficient = sparsity(step)
    dead_mask = stats['steps_since_fired'] >= dead_steps

    out, grads = sae.loss_and_grads(params, state['buffers'], batch,
                                    sparsity_coefficient=coefficient, dead_mask=dead_mask)
    loss = out.loss
    grads = sae.process_grads(params, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    params = sae.process_params(optax.apply_updates(params, updates))

    stats = update_latent_stats(stats, out.fired, step, batch.shape[0], log_every)
    frequency = stats['fire_count'] / stats['window_tokens']
    metrics = dict(out.metrics, loss=loss, grad_norm=grad_norm,
                   learning_rate=lr_schedule(step), sparsity_coefficient=coefficient,
                   dead_fraction=jnp.mean(stats['steps_since_fired'] >= dead_steps),
                   dense_fraction=jnp.mean(frequency > dense_threshold))
    # Remember the first step at which a metric went non-finite, and which ones,
    # so the host can stop with a precise message at its next look.
    names = sorted(metrics)
    bad = jnp.stack([~jnp.all(jnp.isfinite(metrics[n])) for n in names])
    first = (stats['nonfinite_step'] < 0) & jnp.any(bad)
    stats['nonfinite_step'] = jnp.where(first, step, stats['nonfinite_step'])
    stats['nonfinite_mask'] = jnp.where(
        first, jnp.sum(bad.astype(jnp.int32) << jnp.arange(len(names), dtype=jnp.int32)),
        stats['nonfinite_mask'])
    new_state = dict(state, params=params, buffers=out.buffers, opt_state=opt_state,
                     step=step + 1, stats=stats)
    return new_state, metrics

  return train_step


def make_mesh_sae(config: ml_collections.ConfigDict, d_model: int, mesh) -> SparseAutoencoder:
  """The configured SAE, its kernels tuned to `mesh`: BatchTopK sorts its kept
  triples once per shard of the batch's rows, so that no sort crosses devices
  (`KernelTuning.sort_row_blocks`)."""
  shards = sharding_lib.axis_size(mesh, config.mesh.logical_axis_rules, 'batch')
  return make_sae(config.sae, d_model,
                  dataclasses.replace(sparse.DEFAULT_TUNING, sort_row_blocks=shards))


def jit_train_step(sae: SparseAutoencoder, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, mesh, shardings: dict):
  """The step jitted once with the state's shardings in and out, the batch's, and the
  state donated."""
  data_sharding = sharding_lib.batch_sharding(mesh, config.mesh.logical_axis_rules)
  return jax.jit(make_train_step(sae, tx, config), in_shardings=(shardings, data_sharding),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)


def compiled_step_memory(config: ml_collections.ConfigDict, d_model: int, mesh) -> dict:
  """Compiles the train step for `mesh` from the abstract state alone (nothing is
  allocated) and returns XLA's memory analysis of one device, in bytes:
  arguments, outputs, aliased (donated), temporaries, and `peak` = arguments +
  outputs - aliased + temporaries."""
  sae = make_mesh_sae(config, d_model, mesh)
  tx = schedules.make_optimizer(config.optim, config.train.num_steps)
  abstract, shardings = state_lib.state_shardings(sae, tx, config.seed, mesh,
                                                  config.mesh.logical_axis_rules)
  batch = jax.ShapeDtypeStruct(
      (config.train.batch_size, d_model), jnp.float32,
      sharding=sharding_lib.batch_sharding(mesh, config.mesh.logical_axis_rules))
  step = jit_train_step(sae, tx, config, mesh, shardings)
  compiled = step.lower(state_lib.abstract_with_shardings(abstract, shardings), batch).compile()
  m = compiled.memory_analysis()
  out = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
         'aliased': m.alias_size_in_bytes, 'temporaries': m.temp_size_in_bytes}
  out['peak'] = out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries']
  out['state'] = state_lib.per_device_bytes(abstract, shardings)
  return out


def metric_names(sae: SparseAutoencoder, tx, config, abstract_state, batch_shape) -> list[str]:
  """The sorted metric names the step returns (the order of the non-finite mask)."""
  step = make_train_step(sae, tx, config)
  batch = jax.ShapeDtypeStruct(batch_shape, jnp.float32)
  return sorted(jax.eval_shape(step, abstract_state, batch)[1])


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def resolve_store(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The store to train on: the configured one, or synthetic data made in the workdir."""
  if config.data.store:
    return config.data.store
  path = os.path.join(os.path.abspath(workdir), 'data')
  s = config.data.synthetic
  logs.stage('synthetic data: %d true features in %d dimensions, %d rows, in %s',
             s.n_true, s.d_model, s.n_tokens, path)
  # Idempotent: a finished store with these parameters is kept as it is. One
  # process writes it; the others wait, then read it (the workdir is shared).
  if distributed.is_primary():
    synthetic.write_synthetic_store(
        path, n_true=s.n_true, d_model=s.d_model, n_tokens=s.n_tokens,
        mean_active=s.mean_active, power_law_exponent=s.power_law_exponent,
        noise_std=s.noise_std, seed=s.seed)
  distributed.barrier('dictlearn synthetic store')
  return path


def sample_train_rows(reader: store_lib.StoreReader, heldout_tokens: int, n: int, seed: int,
                      scale: float):
  """A seeded random sample of training rows, normalised (for data-dependent init)."""
  n_train = reader.n_rows - heldout_tokens
  rng = np.random.default_rng(seed)
  rows = np.sort(rng.choice(n_train, size=min(n, n_train), replace=False))
  return reader.read_indices(rows).astype(np.float32) * scale


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  """A global batch must split evenly over the data axis and the processes."""
  rules = config.mesh.logical_axis_rules
  shards = sharding_lib.axis_size(mesh, rules, 'batch')
  batch = config.train.batch_size
  if batch <= 0 or batch % shards or batch % jax.process_count():
    raise ValueError(
        f'train.batch_size={batch} is not divisible by the data axis size {shards} '
        f'(mesh {dict(mesh.shape)}) and the process count {jax.process_count()}')


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------

class Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    log.warning('SIGTERM: saving a checkpoint and stopping')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def raise_if_nonfinite(state: dict, names: list[str]) -> None:
  # Only the two replicated scalars come to the host (the latent statistics may
  # be sharded over processes).
  stats = jax.device_get({k: state['stats'][k] for k in ('nonfinite_step', 'nonfinite_mask')})
  step = int(stats['nonfinite_step'])
  if step < 0:
    return
  mask = int(stats['nonfinite_mask'])
  bad = [n for i, n in enumerate(names) if mask >> i & 1]
  raise NonFiniteError(
      f'non-finite {", ".join(bad)} at step {step}; the run stopped without saving that '
      f'state (the last checkpoint is intact): lower optim.learning_rate or check the data')


def stop_requested(preemption: Preemption, step: int, log_every: int) -> bool:
  """Whether to save and stop after `step`. Several processes agree on it (a collective,
  at log steps only, so that they stop at the same step and the check costs little)."""
  if jax.process_count() == 1:
    return preemption.requested
  return step % log_every == 0 and distributed.any_process(preemption.requested)


class Run(NamedTuple):
  """What a run is made of before its first step: derived once, on start or resume."""
  mesh: jax.sharding.Mesh
  manager: Any  # orbax CheckpointManager over workdir/checkpoints
  latest: int | None  # latest checkpoint step, None for a fresh run
  reader: store_lib.StoreReader
  run_info: dict  # the checkpoint's `run` item (`ckpt_lib.run_record`)
  sae: SparseAutoencoder
  tx: optax.GradientTransformation
  abstract: dict  # abstract train state
  shardings: dict  # its shardings


def run_mesh(config: ml_collections.ConfigDict, workdir: str) -> jax.sharding.Mesh:
  """The configured mesh over every process's devices.

  Raises:
    ValueError: the devices cannot hold the mesh, or (several processes) the mesh
      leaves some out; when the workdir holds a checkpoint, the message names the
      mesh it was written on too.
  """
  try:
    mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axis_names)
    distributed.check_mesh(mesh)
  except ValueError as e:
    raise ValueError(f'{e}{checkpoint_mesh_note(workdir)}') from None
  return mesh


def checkpoint_mesh_note(workdir: str) -> str:
  """'; the checkpoint ... was written on mesh {...}' for an error message ('' for none)."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  step = ckpt_lib.latest_step(directory)
  if step is None:
    return ''
  return (f'; the checkpoint at step {step} in {directory} was written on mesh '
          f'{ckpt_lib.saved_mesh(directory, step)} (it restores onto any mesh these devices '
          'can hold: set mesh.shape)')


def check_state_fits(abstract: dict, shardings: dict, mesh, workdir: str, *,
                     device_bytes: int | None = None) -> None:
  """Refuses, before anything is read or written, a state whose shards exceed the memory
  of the devices that would hold them.

  Args:
    device_bytes: a device's memory; None to ask the backend (a CPU does not say:
      no check).

  Raises:
    ValueError: naming the bytes per device, the device's memory and the mesh.
  """
  need = state_lib.per_device_bytes(abstract, shardings)
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  have = device_bytes or (device.memory_stats() or {}).get('bytes_limit')
  if have and need > have:
    raise ValueError(
        f'the train state needs {need / 2**30:.2f} GiB per device on mesh {dict(mesh.shape)}; '
        f'a {device.device_kind} holds {have / 2**30:.2f} GiB: shard the latents over more '
        f'devices (mesh.shape) or use optim.state_dtype=bfloat16'
        + checkpoint_mesh_note(workdir))


def open_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Mesh, checkpoints, store and SAE of a run in `workdir` (new or resumed).

  A resumed run reads its store and normalisation from the latest checkpoint's
  `run` item, so that it continues on exactly the data it started on; its config
  must agree with the checkpoint's (`checks.check_resume_config`). The store must
  hold what the config asks of it (`checks.check_store_fits`).
  """
  mesh = run_mesh(config, workdir)
  check_batch(config, mesh)
  manager = ckpt_lib.make_manager(ckpt_lib.checkpoint_dir(workdir),
                                  keep=config.train.keep_checkpoints)
  newest = ckpt_lib.read_newest_metadata(manager)
  latest = None
  if newest is not None:
    latest, saved_config, run_info = newest
    checks.check_resume_config(saved_config, config, workdir=workdir, step=latest,
                               run_info=run_info)
    store_path = ckpt_lib.recorded_store(run_info, workdir)
  else:
    run_info, store_path = None, resolve_store(config, workdir)
  reader = store_lib.StoreReader(store_path,
                                 d_model=config.data.d_model if config.data.d_model > 0 else None)
  checks.check_store_fits(config, reader)
  if run_info is None:
    scale = loader_lib.normalization_scale(reader) if config.data.normalize else 1.0
    run_info = ckpt_lib.run_record(store_path, workdir, d_model=reader.d_model, data_scale=scale)
  sae = make_mesh_sae(config, reader.d_model, mesh)
  tx = schedules.make_optimizer(config.optim, config.train.num_steps)
  abstract, shardings = state_lib.state_shardings(sae, tx, config.seed, mesh,
                                                  config.mesh.logical_axis_rules)
  check_state_fits(abstract, shardings, mesh, workdir)
  return Run(mesh, manager, latest, reader, run_info, sae, tx, abstract, shardings)


def initial_state(run: Run, config: ml_collections.ConfigDict) -> dict:
  """The latest checkpoint in the workdir, else `train.init_from`, else a fresh state
  (with b_dec at the geometric median of a sample of training rows)."""
  if run.latest is not None:  # the newest checkpoint that restores and verifies
    _, state, _, _ = ckpt_lib.restore_latest_good(run.manager, run.abstract, run.shardings)
    return state
  if config.train.init_from:  # another run's: fall back past damage, but move nothing there
    source = ckpt_lib.make_manager(config.train.init_from, read_only=True)
    try:
      _, state, _, _ = ckpt_lib.restore_latest_good(source, run.abstract, run.shardings,
                                                    move_damaged=False)
    finally:
      source.close()
    return state
  state = state_lib.create_state(run.sae, run.tx, config.seed, run.shardings)
  sample = sample_train_rows(run.reader, config.data.heldout_tokens, config.sae.b_dec_init_rows,
                             config.seed, run.run_info['data_scale'])
  init_b_dec = jax.jit(run.sae.init_b_dec, out_shardings=run.shardings['params'])
  # A numpy sample (the same on every process) enters the jit replicated.
  state['params'] = init_b_dec(state['params'], np.asarray(sample, np.float32))
  return state


def _train_loop(run: Run, config: ml_collections.ConfigDict, state: dict, workdir: str,
                writer: metrics_lib.MetricWriter, stop_at: int | None) -> tuple[dict, dict]:
  """Steps from the state's step to num_steps (or stop_at, or SIGTERM), logging and
  checkpointing on the way. Returns (state, {'train': last metrics, 'preempted',
  'stopped_at', 'rows_read' from the store})."""
  num_steps, batch_size = config.train.num_steps, config.train.batch_size
  rules = config.mesh.logical_axis_rules
  data_sharding = sharding_lib.batch_sharding(run.mesh, rules)
  names = metric_names(run.sae, run.tx, config, run.abstract, (batch_size, run.reader.d_model))
  train_step = jit_train_step(run.sae, run.tx, config, run.mesh, run.shardings)
  config_dict = config.to_dict()
  start_step = int(state['step'])
  out = {'train': {}, 'preempted': False}
  loader = loader_lib.Loader(
      run.reader, batch_size=batch_size, seed=config.seed, start_step=start_step,
      scale=run.run_info['data_scale'], sharding=data_sharding, prefetch=config.data.prefetch,
      shuffle_window_chunks=config.data.shuffle_window_chunks,
      heldout_tokens=config.data.heldout_tokens)
  progress = metrics_lib.Progress(num_steps, start_step, batch_size,
                                  enabled=distributed.is_primary())
  accounting = throughput.Accounting(config, run.reader.d_model, run.mesh)
  wait_time, window_start = 0.0, time.perf_counter()
  try:
    with Preemption() as preemption, loader:
      step = start_step
      batches = iter(loader)
      while step < num_steps:
        t0 = time.perf_counter()
        batch = next(batches)
        wait_time += time.perf_counter() - t0
        state, metrics = train_step(state, batch)
        step += 1
        if step % config.train.log_every == 0 or step == num_steps:
          raise_if_nonfinite(state, names)
          record = metrics_lib.to_python(metrics)
          elapsed = time.perf_counter() - window_start
          record['data_wait_fraction'] = wait_time / max(elapsed, 1e-9)
          record.update(accounting.record(progress.update(step), record))
          progress.show(record)
          writer.write(step, record)
          out['train'] = record
          wait_time, window_start = 0.0, time.perf_counter()
        preempted = stop_requested(preemption, step, config.train.log_every)
        if (step % config.train.checkpoint_every == 0 or step in (num_steps, stop_at)
            or preempted):
          raise_if_nonfinite(state, names)
          ckpt_lib.save(run.manager, step, state, config_dict, run.run_info)
        if preempted or step == stop_at:
          out.update(preempted=preempted, stopped_at=step)
          break
    ckpt_lib.wait_for_saves(run.manager)
  finally:
    progress.close()
  out['rows_read'] = loader.rows_read
  return state, out


def final_evaluation(run: Run, config: ml_collections.ConfigDict, state: dict,
                      store_path: str) -> dict:
  """Held-out FVU, L0, dead/dense (and, on synthetic data, the recovered fraction)."""
  evaluation = evaluate_reconstruction(
      run.sae, state['params'], state['buffers'],
      loader_lib.heldout_batches(run.reader, config.train.batch_size, config.train.eval_batches,
                                 heldout_tokens=config.data.heldout_tokens,
                                 scale=run.run_info['data_scale'],
                                 sharding=sharding_lib.batch_sharding(
                                     run.mesh, config.mesh.logical_axis_rules)),
      dense_threshold=config.sae.dense_threshold)
  if not config.data.store:  # synthetic data: how much of the true dictionary was found
    evaluation['recovered_fraction'] = synthetic.recovered_fraction(
        synthetic.load_true_dictionary(store_path), distributed.to_host(state['params']['W_dec']),
        threshold=config.data.synthetic.recovered_cosine)
  return evaluation


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at: int | None = None) -> dict:
  """Trains an SAE as configured, checkpointing into `workdir`, and evaluates it.

  Resumes from the latest checkpoint in `workdir` when there is one. Checks the
  whole config, the store and a resume's config before any work, and holds the
  workdir's lock (`checks.WorkdirLock`) while it runs.

  Args:
    config: a config as made by `experiments/base.py`.
    workdir: run directory (checkpoints, metrics.jsonl, tensorboard/, data/).
    stop_at: stop once this step is reached, saving a checkpoint and evaluating
      (the schedules still follow `config.train.num_steps`); a later call
      resumes from there. Sweeps use it for evaluations along training.

  Returns:
    A summary: final step, the last training metrics, the held-out evaluation,
    whether the run was preempted, and where its outputs are.
  """
  checks.validate_config(config)
  check_batch(config, run_mesh(config, workdir))  # before the workdir is touched
  checks.prepare_workdir(workdir)
  with checks.WorkdirLock(workdir):
    return _run_locked(config, workdir, stop_at)


def _run_locked(config: ml_collections.ConfigDict, workdir: str, stop_at: int | None) -> dict:
  """`train_and_evaluate` once the config is checked and the workdir locked."""
  run = open_run(config, workdir)  # refuses bad input before writing anything
  store_path = run.reader.path
  summary = {'workdir': os.path.abspath(workdir), 'store': store_path,
             'metrics': os.path.join(os.path.abspath(workdir), 'metrics.jsonl'),
             'checkpoints': ckpt_lib.checkpoint_dir(workdir)}
  writer = metrics_lib.MetricWriter(workdir, enabled=distributed.is_primary())
  try:
    state = initial_state(run, config)
    logs.stage('training a %s SAE of %d latents on %s (d_model %d) from step %d to %d, mesh %s',
               run.sae.name, run.sae.n_latents, store_path, run.reader.d_model,
               int(state['step']), config.train.num_steps, dict(run.mesh.shape))
    state, progress = _train_loop(run, config, state, workdir, writer, stop_at)
    summary.update(progress, step=int(state['step']))
    finished = summary['step'] == config.train.num_steps or (
        stop_at is not None and summary.get('stopped_at') == stop_at)
    if finished and not summary['preempted'] and config.train.eval_batches > 0:
      summary['eval'] = final_evaluation(run, config, state, store_path)
      writer.write(summary['step'], summary['eval'], prefix='eval')
  finally:
    writer.close()
    ckpt_lib.close(run.manager)
  return summary


def summary_text(summary: dict) -> str:
  """A few lines for a person: where the run is, and its held-out evaluation."""
  lines = [f"step {summary['step']}" + (' (preempted: run the command again to resume)'
                                         if summary.get('preempted') else '')]
  evaluation = summary.get('eval')
  if evaluation:
    parts = [f"held-out FVU {evaluation['fvu']:.4f}", f"L0 {evaluation['l0']:.1f}",
             f"dead {evaluation['dead_fraction']:.3f}", f"dense {evaluation['dense_fraction']:.3f}"]
    if 'recovered_fraction' in evaluation:
      parts.append(f"recovered {evaluation['recovered_fraction']:.3f}")
    lines.append('  ' + '   '.join(parts))
  lines.append(f"  outputs: {summary['workdir']} (checkpoints/, metrics.jsonl, tensorboard/, "
               'log.txt)')
  return '\n'.join(lines)
