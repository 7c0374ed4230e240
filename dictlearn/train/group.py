"""Several SAEs on one stream of batches: each batch read once, one jitted step for all.

Runs that share their data order (`data_order`: the same store, seed, batch size,
shuffle window, held-out rows, normalisation and mesh) see the same batch at
every step, since the rows of step i are a pure function of (seed, i). A group
reads each batch once, puts it on the devices once, and runs every member's step
inside one jitted function:

    states, metrics = group_step((state_1, ..., state_m), batch)

Members sit side by side in that function, each with its own step, shardings and
donated state, whatever their sizes, k, architecture or learning rate. Same-shaped
members are not stacked with `vmap`: vmap turns every `lax.cond` of the sparse
paths (the exact dense fallback on overflow, AuxK only when latents are dead)
into a select that runs both branches at every step, which costs more than the
stacking saves.

Each member is an ordinary run in its own workdir: its checkpoints, metrics.jsonl,
TensorBoard events and evaluations are those `train_and_evaluate` writes (the
same numbers, up to the float rounding of XLA fusing the members together), so a
member resumes alone or in a group, and the sweep's `collect` reads it.

Resume: each member restores its own latest checkpoint. The loop starts at the
earliest member's step; a member that is ahead joins when the loop reaches its
step, and leaves at its num_steps. The group step is compiled once per set of
members taking part.
"""
import logging
import os
import time
from typing import Callable, Sequence

import jax
import ml_collections

from dictlearn import distributed
from dictlearn import logs
from dictlearn import sharding as sharding_lib
from dictlearn.data import loader as loader_lib
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import metrics as metrics_lib
from dictlearn.train import throughput
from dictlearn.train import trainer

log = logging.getLogger(__name__)


def data_order(config: ml_collections.ConfigDict) -> tuple:
  """What decides the batches a run sees, step by step: runs with equal keys can share
  one read of every batch."""
  d = config.data
  store = d.store or ('synthetic', tuple(sorted(d.synthetic.to_dict().items())))
  return (store, config.seed, config.train.batch_size, d.shuffle_window_chunks,
          d.heldout_tokens, d.normalize, d.d_model, tuple(config.mesh.shape),
          tuple(config.mesh.axis_names), tuple(tuple(r) for r in config.mesh.logical_axis_rules))


class Member:
  """One run of a group: its Run (mesh, checkpoints, SAE, optimizer), state and writer."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, eval_steps):
    self.config, self.workdir = config, workdir
    self.run = trainer.open_run(config, workdir)
    self.writer = metrics_lib.MetricWriter(workdir, enabled=distributed.is_primary())
    self.state = trainer.initial_state(self.run, config)
    self.step = int(self.state['step'])
    self.num_steps = config.train.num_steps
    self.eval_steps = set(eval_steps) | {self.num_steps}
    d_model = self.run.reader.d_model
    self.names = trainer.metric_names(self.run.sae, self.run.tx, config, self.run.abstract,
                                      (config.train.batch_size, d_model))
    self.accounting = throughput.Accounting(config, d_model, self.run.mesh)
    self.step_fn = trainer.make_train_step(self.run.sae, self.run.tx, config)
    self.config_dict = config.to_dict()
    self.summary = {'workdir': os.path.abspath(workdir), 'store': self.run.reader.path,
                    'metrics': os.path.join(os.path.abspath(workdir), 'metrics.jsonl'),
                    'checkpoints': ckpt_lib.checkpoint_dir(workdir), 'train': {},
                    'preempted': False, 'evals': {}}

  @property
  def finished(self) -> bool:
    return self.step >= self.num_steps

  def close(self):
    self.run.manager.wait_until_finished()
    self.writer.close()
    self.run.manager.close()


def check_data_order(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]):
  """Raises ValueError, naming both runs and their keys, unless every run shares the
  first one's data order."""
  for config, workdir in zip(configs[1:], workdirs[1:]):
    if data_order(config) != data_order(configs[0]):
      raise ValueError(f'runs {workdirs[0]} and {workdir} do not share their data order '
                       f'({data_order(configs[0])} against {data_order(config)}): '
                       'group only runs with the same store, seed, batch size, window and mesh')


def _check_same_data(members: Sequence[Member]) -> None:
  first = members[0]
  for m in members[1:]:
    if m.run.run_info['data_scale'] != first.run.run_info['data_scale']:
      raise ValueError(f'runs {first.workdir} and {m.workdir} normalise their data differently '
                       f"({first.run.run_info['data_scale']} against "
                       f"{m.run.run_info['data_scale']})")


def _group_step(members: Sequence[Member]):
  """One jitted step over the members, side by side, the states donated."""
  steps = [m.step_fn for m in members]
  mesh, rules = members[0].run.mesh, members[0].config.mesh.logical_axis_rules

  def group_step(states, batch):
    outs = [step(state, batch) for step, state in zip(steps, states)]
    return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

  shardings = tuple(m.run.shardings for m in members)
  replicated = tuple(sharding_lib.replicated(mesh) for _ in members)
  return jax.jit(group_step, in_shardings=(shardings, sharding_lib.batch_sharding(mesh, rules)),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def _evaluate(member: Member, after_eval) -> None:
  """The held-out evaluation of a member at its step (after its checkpoint there)."""
  member.run.manager.wait_until_finished()
  evaluation = trainer.final_evaluation(member.run, member.config, member.state,
                                        member.run.reader.path)
  member.writer.write(member.step, evaluation, prefix='eval')
  member.summary['evals'][member.step] = evaluation
  if after_eval is not None:
    after_eval(member, member.step)


def train_group(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str], *,
                eval_steps: Sequence[Sequence[int]] | None = None,
                after_eval: Callable[[Member, int], None] | None = None,
                eval_done: Callable[[str, int], bool] | None = None,
                stop_at: int | None = None) -> list[dict]:
  """Trains runs that share their data order together, each batch read once.

  Args:
    configs: one config per run (experiments/base.py); `data_order` must agree.
    workdirs: one run directory per run (resumed when it holds checkpoints).
    eval_steps: per run, the steps at which it is checkpointed and evaluated on the
      held-out rows (its num_steps always is); None for only the last.
    after_eval: called as after_eval(member, step) after each evaluation (e.g. the
      language model's CE loss with the SAE spliced in).
    eval_done: eval_done(workdir, step): whether a run's evaluation at a step is
      complete (default: recorded in its metrics); a run resumed at an evaluation
      step that is not gets it before training goes on.
    stop_at: stop once the loop reaches this step, every run checkpointed there (a
      later call resumes); the schedules still follow each run's num_steps.

  Returns:
    One summary per run: workdir, store, step, last training metrics, the
    evaluations by step, whether it was preempted.

  Raises:
    ValueError: runs that do not share their data order, or bad input of a run.
    NonFiniteError: a member's metric went non-finite (the message names its workdir).
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError(f'train_group needs as many workdirs as configs (at least one), got '
                     f'{len(configs)} configs and {len(workdirs)} workdirs')
  eval_steps = eval_steps or [()] * len(configs)
  check_data_order(configs, workdirs)  # before anything is written
  members = []
  try:
    for config, workdir, steps in zip(configs, workdirs, eval_steps):
      members.append(Member(config, workdir, steps))
    _check_same_data(members)
    _train(members, after_eval, eval_done or _recorded, stop_at)
  finally:
    for m in members:
      m.close()
  return [dict(m.summary, step=m.step, eval=m.summary['evals'].get(m.num_steps))
          for m in members]


def _train(members: Sequence[Member], after_eval, eval_done, stop_at) -> None:
  pending = [m for m in members if not m.finished]
  for m in members:  # an evaluation point a killed run reached but did not record
    if (m.step in m.eval_steps and m.config.train.eval_batches > 0
        and not eval_done(m.workdir, m.step)):
      _evaluate(m, after_eval)
  if not pending:
    return
  first = pending[0]
  start, end = min(m.step for m in pending), max(m.num_steps for m in pending)
  config = first.config
  batch_size = config.train.batch_size
  logs.stage('training %d SAEs on one read of %s (d_model %d), steps %d to %d, mesh %s',
             len(pending), first.run.reader.path, first.run.reader.d_model, start, end,
             dict(first.run.mesh.shape))
  loader = loader_lib.Loader(
      first.run.reader, batch_size=batch_size, seed=config.seed, start_step=start,
      scale=first.run.run_info['data_scale'],
      sharding=sharding_lib.batch_sharding(first.run.mesh, config.mesh.logical_axis_rules),
      prefetch=config.data.prefetch, shuffle_window_chunks=config.data.shuffle_window_chunks,
      heldout_tokens=config.data.heldout_tokens)
  progress = metrics_lib.Progress(end, start, batch_size, enabled=distributed.is_primary())
  compiled, active, step = {}, [], start
  wait_time, window_start, window_step = 0.0, time.perf_counter(), start
  try:
    with trainer.Preemption() as preemption, loader:
      batches = iter(loader)
      while True:
        active = [m for m in pending if m.step == step and not m.finished]
        if not active:
          break
        key = tuple(id(m) for m in active)
        if key not in compiled:
          compiled = {key: _group_step(active)}  # members only leave or join: keep one
        t0 = time.perf_counter()
        batch = next(batches)
        wait_time += time.perf_counter() - t0
        states, metrics = compiled[key](tuple(m.state for m in active), batch)
        step += 1
        for m, state in zip(active, states):
          m.state, m.step = state, step
        stop = trainer.stop_requested(preemption, step, config.train.log_every)
        if any(step % m.config.train.log_every == 0 or step == m.num_steps for m in active):
          elapsed = time.perf_counter() - window_start
          rate = progress.update(step) if step > window_step else 0.0
          for m, member_metrics in zip(active, metrics):
            _log(m, member_metrics, rate, wait_time / max(elapsed, 1e-9), len(active))
          progress.show(active[0].summary['train'])
          wait_time, window_start, window_step = 0.0, time.perf_counter(), step
        for m in active:
          if (step % m.config.train.checkpoint_every == 0 or step in m.eval_steps or stop
              or step == stop_at):
            trainer.raise_if_nonfinite(m.state, m.names)
            ckpt_lib.save(m.run.manager, step, m.state, m.config_dict, m.run.run_info)
          if step in m.eval_steps and not stop and m.config.train.eval_batches > 0:
            _evaluate(m, after_eval)
        if stop:
          for m in active:
            m.summary['preempted'] = True
        if stop or step == stop_at:
          break
  finally:
    progress.close()
  for m in pending:  # one read of the data served them all
    m.summary.update(rows_read=loader.rows_read, group_size=len(pending))
  log.info('group of %d runs stopped at step %d; %d rows read from the store', len(pending),
           step, loader.rows_read)


def _log(m: Member, metrics, rate: float, wait_fraction: float, group_size: int) -> None:
  try:
    trainer.raise_if_nonfinite(m.state, m.names)
  except trainer.NonFiniteError as e:
    raise trainer.NonFiniteError(f'run {m.workdir}: {e}') from None
  record = metrics_lib.to_python(metrics)
  record['data_wait_fraction'] = wait_fraction
  record.update(m.accounting.record(rate, record))
  record['group_size'] = group_size
  m.writer.write(m.step, record)
  m.summary['train'] = record


def _recorded(workdir: str, step: int) -> bool:
  return any(r['step'] == step for r in metrics_lib.read_metrics(workdir, 'eval'))
