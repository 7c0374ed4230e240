"""What the format converters share: the dictlearn side of an export or an import.

A `Snapshot` is one checkpoint's SAE as host arrays with the facts that rebuild
its run (config, run facts, step). `read_snapshot` takes one from a workdir;
`write_snapshot` writes one as a run workdir whose `checkpoints/` the trainer,
`dictlearn.evals` and the tools read like a native run's (a fresh optimizer
state and fresh latent statistics beside the imported parameters).

Exports fold dictlearn's activation scale into the weights and write what makes
the way back exact (`dictlearn.interop.exact`); the `dictlearn` block they put
into the peers' configs (`dictlearn_block`) carries everything but the weights.

Every directory is written beside its destination and renamed into place
(`new_directory`), so a failed export or import leaves nothing half-written and
never touches what was there.
"""
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dictlearn import cli
from dictlearn.data import store as store_lib
from dictlearn.sae import make_sae
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import schedules
from dictlearn.train import state as state_lib

# Version of the `dictlearn` block that exports write into the peers' configs.
FORMAT_VERSION = 1


@dataclasses.dataclass
class Snapshot:
  """One checkpoint's SAE on the host.

  Attributes:
    config: the run's whole config as a dict (what the checkpoint's `config` item holds).
    run_info: the checkpoint's `run` item: 'store' (None when the run has none),
      'd_model', 'data_scale'; an imported run adds 'site' and 'model'.
    step: the checkpoint step.
    params: parameter name -> numpy array (the architecture's names and dtypes).
    buffers: buffer name -> numpy array.
    store: the store found where the run records it (None: it has none, or it is gone).
  """
  config: dict
  run_info: dict
  step: int
  params: dict
  buffers: dict
  store: str | None = None

  @property
  def architecture(self) -> str:
    return self.config['sae']['architecture']


def read_snapshot(workdir: str, step: int | None = None) -> Snapshot:
  """The SAE of a run's checkpoint (default: the latest) as host arrays."""
  workdir = ckpt_lib.run_directory(workdir)
  directory = ckpt_lib.checkpoint_dir(workdir)
  step, config, run_info = ckpt_lib.read_metadata(directory, step)
  _, state = ckpt_lib.restore_arrays(directory, step)
  host = lambda tree: {k: np.asarray(jax.device_get(v)) for k, v in tree.items()}
  store = None
  if run_info['store']:
    try:
      store = ckpt_lib.recorded_store(run_info, workdir)
    except FileNotFoundError as e:
      logging.warning('%s', e)
  return Snapshot(config, run_info, int(step), host(state['params']), host(state['buffers']),
                  store)


def site_and_model(snapshot: Snapshot) -> tuple[str | None, str | None]:
  """(hook site, model) of a run: from its store's manifest, else from its run facts."""
  if snapshot.store:
    manifest = store_lib.StoreReader(snapshot.store).manifest
    return manifest['site'], manifest['model']
  return snapshot.run_info.get('site'), snapshot.run_info.get('model')


def check_store(store: str, *, site: str | None, d_model: int, model: str | None = None):
  """Opens the store to attach to an imported SAE; ValueError when it does not match.

  Args:
    store: store path or URL.
    site: the hook site the SAE reads (None: not known, not checked).
    d_model: the SAE's input width.
    model: the model the SAE was trained on, when known in the store's naming.

  Returns:
    The store's manifest.
  """
  manifest = store_lib.StoreReader(store).manifest
  problems = []
  if manifest['d_model'] != d_model:
    problems.append(f"d_model {manifest['d_model']}, the SAE reads {d_model}")
  if site is not None and manifest['site'] != site:
    problems.append(f"site {manifest['site']!r}, the SAE reads {site!r}")
  if model is not None and manifest['model'] != model:
    problems.append(f"model {manifest['model']!r}, the SAE was trained on {model!r}")
  if problems:
    raise ValueError(f'store at {store} does not match the SAE: it has ' + '; '.join(problems))
  return manifest


# ---- the dictlearn block written into exported configs ------------------------


def dictlearn_block(snapshot: Snapshot, site: str | None, model: str | None) -> dict:
  """What an import needs to rebuild `snapshot` exactly (everything but the weights)."""
  return {
      'format_version': FORMAT_VERSION,
      'architecture': snapshot.architecture,
      'step': snapshot.step,
      'config': snapshot.config,
      'run': snapshot.run_info,
      'site': site,
      'model': model,
      'buffers': {k: float(v) for k, v in snapshot.buffers.items()},
  }


def check_block(block: dict, where: str) -> dict:
  """Validates a `dictlearn` block read from `where`; ValueError on an unknown version."""
  version = block.get('format_version') if isinstance(block, dict) else None
  if version != FORMAT_VERSION:
    raise ValueError(f'{where}: dictlearn block format_version={version!r}; this dictlearn '
                     f'reads format_version {FORMAT_VERSION}')
  return block


def buffers_from_block(block: dict, like: dict) -> dict:
  """The block's scalar buffers as arrays of the dtypes in `like` (name -> abstract)."""
  return {k: np.asarray(block['buffers'][k], like[k].dtype) for k in like}


def abstract_sae(config: dict, d_model: int) -> tuple[dict, dict]:
  """(params, buffers) of the architecture `config` describes, as ShapeDtypeStructs."""
  sae = make_sae(ml_collections.ConfigDict(config['sae']), d_model)
  return jax.eval_shape(lambda: sae.init(jax.random.key(0)))


# ---- writing ------------------------------------------------------------------


@contextlib.contextmanager
def new_directory(path: str):
  """Yields a temporary sibling of `path` to fill; renames it to `path` on success.

  Raises:
    FileExistsError: `path` exists and is not an empty directory (left as it is).
  """
  path = os.path.abspath(path)
  if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
    raise FileExistsError(f'{path} already exists and is not empty; choose a new path '
                          '(nothing there was changed)')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + '.tmp-', dir=parent)
  try:
    yield tmp
    if os.path.isdir(path):
      os.rmdir(path)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _check_arrays(kind: str, abstract: dict, arrays: dict, where: str):
  if set(abstract) != set(arrays):
    raise ValueError(f'{where}: {kind} expected {sorted(abstract)}, got {sorted(arrays)}')
  for name, spec in abstract.items():
    got = np.asarray(arrays[name])
    if got.shape != spec.shape or got.dtype != spec.dtype:
      raise ValueError(f'{where}: {kind} {name!r} expected shape {tuple(spec.shape)} '
                       f'{spec.dtype}, got {got.shape} {got.dtype}')


def write_snapshot(snapshot: Snapshot, workdir: str, *, where: str) -> str:
  """Writes `snapshot` as the checkpoint of a run in `workdir`.

  Args:
    snapshot: the SAE and its run facts.
    workdir: the run directory; it must not hold checkpoints yet.
    where: what the snapshot came from, for error messages.

  Returns:
    The checkpoint directory.

  Raises:
    ValueError: the arrays are not the ones the config's architecture has.
    FileExistsError: `workdir` already holds checkpoints.
  """
  config = ml_collections.ConfigDict(snapshot.config)
  sae = make_sae(config.sae, snapshot.run_info['d_model'])
  tx = schedules.make_optimizer(config.optim, config.train.num_steps)
  init = lambda: state_lib.init_state(sae, tx, config.seed)
  abstract = jax.eval_shape(init)
  _check_arrays('params', abstract['params'], snapshot.params, where)
  _check_arrays('buffers', abstract['buffers'], snapshot.buffers, where)
  state = init()  # eagerly: compiling the whole init costs seconds, its ops are cached
  state['params'] = {k: jnp.asarray(v) for k, v in snapshot.params.items()}
  state['buffers'] = {k: jnp.asarray(v) for k, v in snapshot.buffers.items()}
  state['step'] = jnp.asarray(snapshot.step, jnp.int32)
  run_info = dict(snapshot.run_info)
  if run_info['store']:  # recorded as the trainer records it, relative to this workdir too
    run_info.update(ckpt_lib.run_record(run_info['store'], workdir, d_model=run_info['d_model'],
                                        data_scale=run_info['data_scale']))
  directory = ckpt_lib.checkpoint_dir(workdir)
  with new_directory(directory) as tmp:
    manager = ckpt_lib.make_manager(tmp, keep=1, async_save=False)
    try:
      ckpt_lib.save(manager, snapshot.step, state, snapshot.config, run_info)
      manager.wait_until_finished()
    finally:
      manager.close()
  logging.info('wrote a %s checkpoint (step %d) to %s', snapshot.architecture, snapshot.step,
               directory)
  return directory


def imported_config(base: ml_collections.ConfigDict, *, architecture: str, n_latents: int,
                    d_model: int, k: int | None, param_dtype: str, store: str | None) -> dict:
  """The config of an SAE imported from another library: `base` with the SAE's fields.

  Fields the file does not describe (optimizer, batch, held-out rows) come from `base`;
  `data.normalize` is off because the run's data_scale is the imported one.
  """
  c = ml_collections.ConfigDict(base.to_dict())
  c.sae.architecture, c.sae.n_latents, c.sae.param_dtype = architecture, n_latents, param_dtype
  if k is not None:
    c.sae.k = k
  c.sae.k, c.sae.aux_k = min(c.sae.k, n_latents), min(c.sae.aux_k, n_latents)
  c.data.store, c.data.d_model, c.data.normalize = store or '', d_model, False
  return c.to_dict()


def attach_store(snapshot: Snapshot, store: str, *, site: str | None,
                 model: str | None) -> Snapshot:
  """`snapshot` reading `store`, once checked against the SAE's site, width and model
  (a None site or model is not checked)."""
  store = store if '://' in store else os.path.abspath(store)
  check_store(store, site=site, d_model=snapshot.run_info['d_model'], model=model)
  config = dict(snapshot.config, data=dict(snapshot.config['data'], store=store))
  return dataclasses.replace(snapshot, config=config, store=store,
                             run_info=dict(snapshot.run_info, store=store))


# ---- command line ---------------------------------------------------------------


def base_config_if_present(spec: str) -> ml_collections.ConfigDict | None:
  """`get_config(arg)` of the experiment file 'path[:arg]', or None when there is no such
  file (the importers then ask for one only if the SAE needs it)."""
  return cli.load_config_file(spec) if os.path.isfile(spec.partition(':')[0]) else None


def make_parser(prog: str, description: str, what: str):
  """(parser, export sub-parser, import sub-parser) with the flags both formats share."""
  parser = cli.ArgumentParser(prog=prog, description=description)
  actions = parser.add_subparsers(dest='action', required=True)
  export = actions.add_parser('export', help=f'write a checkpoint as {what}')
  export.add_argument('--workdir', required=True, help='dictlearn run directory')
  export.add_argument('--out', required=True, help='directory to create')
  export.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
  imp = actions.add_parser('import', help=f'write {what} as a dictlearn run')
  imp.add_argument('sae_dir', help=f'directory holding {what}')
  imp.add_argument('--workdir', required=True, help='run directory to create checkpoints/ in')
  imp.add_argument('--store', default=None,
                   help='activation store to attach (its site and width are checked)')
  imp.add_argument('--config', default=os.path.join(cli.EXPERIMENTS_DIR, 'base.py'),
                   help='experiment file[:arg] giving the fields the SAE file does not '
                        'carry (ignored for a dictlearn export, which carries its own)')
  return parser, export, imp


def run_command(main, parser, argv) -> int:
  """Runs `main(args)` through `cli.run_tool` (one-line errors), logging into an import's
  workdir."""
  return cli.run_tool(main, parser, argv,
                      log_dir=lambda a: a.workdir if a.action == 'import' else None)
