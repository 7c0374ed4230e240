"""SAELens's on-disk format: export a dictlearn checkpoint, import a SAELens SAE.

    python -m dictlearn.interop.saelens export --workdir DIR --out SAE_DIR [--step N]
        [--model_name NAME]
    python -m dictlearn.interop.saelens import SAE_DIR --workdir DIR [--store PATH]
        [--config EXPERIMENT] [--norm_scaling_factor S]

The format is sae-lens 6.54.12's (`SAE.save_model`, read by `SAE.load_from_disk`):
`cfg.json` (d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, metadata {sae_lens_version, model_name, hook_name, ...},
architecture, and per architecture k / rescale_acts_by_decoder_norm) beside
`sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in], JumpReLU's threshold [d_sae]). Configs of sae-lens before 6.0
(top-level hook_point, activation_fn_str, ...) are read as SAELens reads them.

    dictlearn   SAELens architecture   apply_b_dec_to_input   weights beyond the four
    relu_l1     standard               false                  -
    topk        topk (k)               true                   -
    jumprelu    jumprelu               false                  threshold = exp(log_threshold)
    batchtopk   jumprelu               true                   threshold = theta for every latent

BatchTopK is written the way SAELens writes its own after training: a JumpReLU whose
every threshold is the learned inference threshold (ReLU then `pre > theta` is
dictlearn's `pre > max(theta, 0)`), with metadata.training_architecture 'batchtopk'.
dictlearn's data_scale is folded into the weights as SAELens's trainer folds its
normalisation (normalize_activations 'none'), so `SAE.load_from_disk(...)` maps raw
activations to their reconstruction. metadata.dictlearn carries the config, run
facts, step and buffers (`common.dictlearn_block`), so an export imports back
exactly (`exact.EXACT_FILE`).

An SAE from SAELens itself (a `save_model` directory, or a pretrained release saved
locally) imports as: standard -> relu_l1, topk -> topk, jumprelu -> jumprelu (or
batchtopk when SAELens trained it as one and says its k). dictlearn's relu_l1 and
jumprelu encode x and its topk and batchtopk encode x - b_dec, so a different
apply_b_dec_to_input is folded into b_enc (b_enc -/+ b_dec @ W_enc), and TopK's
rescale_acts_by_decoder_norm into the encoder and unit decoder rows. Thresholds
<= 0 become log_threshold = -inf (theta = 0: ReLU, as SAELens computes it).
normalize_activations 'expected_average_only_in' needs the factor SAELens keeps in
its release list (`--norm_scaling_factor`); it becomes the run's data_scale.
"""
import json
import logging
import os
import sys

import ml_collections
import numpy as np
from safetensors import numpy as safetensors_np

from dictlearn.data import store as store_lib
from dictlearn.interop import common
from dictlearn.interop import exact
from dictlearn.sae.jumprelu import JumpReLUSAE

SAELENS_VERSION = '6.54.12'  # the sae-lens whose format this module follows
CFG_FILE = 'cfg.json'
WEIGHTS_FILE = 'sae_weights.safetensors'

# dictlearn architecture -> (SAELens architecture, apply_b_dec_to_input).
TO_SAELENS = {
    'relu_l1': ('standard', False),
    'topk': ('topk', True),
    'jumprelu': ('jumprelu', False),
    'batchtopk': ('jumprelu', True),
}
FROM_SAELENS = {'standard': 'relu_l1', 'topk': 'topk', 'jumprelu': 'jumprelu'}
_DTYPES = {'float32': np.float32, 'torch.float32': np.float32,
           'bfloat16': 'bfloat16', 'torch.bfloat16': 'bfloat16'}
_WIDENED = ('float16', 'torch.float16', 'float64', 'torch.float64')
_BASE_KEYS = ('W_enc', 'b_enc', 'W_dec', 'b_dec')
# sae-lens < 6 kept these at the top level (sae_lens.loading LLM_METADATA_KEYS).
_METADATA_KEYS = ('model_name', 'hook_name', 'model_class_name', 'hook_head_index',
                  'model_from_pretrained_kwargs', 'prepend_bos', 'exclude_special_tokens',
                  'neuronpedia_id', 'context_size', 'seqpos_slice', 'dataset_path',
                  'sae_lens_version', 'sae_lens_training_version')


# ---- export ---------------------------------------------------------------------


def to_saelens(snapshot: common.Snapshot, *, model_name: str | None = None) -> tuple[dict, dict]:
  """(cfg.json dict, weights) of `snapshot` in SAELens's format (see the module docstring).

  Raises:
    ValueError: an architecture SAELens cannot hold.
  """
  arch = snapshot.architecture
  if arch not in TO_SAELENS:
    raise ValueError(f'architecture {arch!r} has no SAELens form; expected one of '
                     f'{sorted(TO_SAELENS)}')
  saelens_arch, apply_b_dec = TO_SAELENS[arch]
  params, sae_cfg = snapshot.params, snapshot.config['sae']
  dtype = params['W_enc'].dtype
  weights = exact.fold_scale({k: params[k] for k in _BASE_KEYS},
                             snapshot.run_info['data_scale'])
  if arch == 'jumprelu':  # computed as dictlearn computes it, so both compare the same theta
    weights['threshold'] = np.asarray(JumpReLUSAE.threshold(params)).astype(dtype)
  elif arch == 'batchtopk':
    weights['threshold'] = np.full(params['b_enc'].shape, snapshot.buffers['threshold'], dtype)
  site, model = common.site_and_model(snapshot)
  metadata = {'sae_lens_version': SAELENS_VERSION, 'sae_lens_training_version': None,
              'model_name': model_name or model, 'hook_name': site, 'hook_head_index': None}
  extra = (store_lib.StoreReader(snapshot.store).manifest.get('extra') or {}
           ) if snapshot.store else {}
  if 'bos_id' in extra:  # a harvested store: contexts of context_length starting with BOS
    metadata.update(prepend_bos=True, context_size=extra['context_length'])
  metadata['training_architecture'] = 'batchtopk' if arch == 'batchtopk' else saelens_arch
  if arch in ('topk', 'batchtopk'):
    metadata['training_architecture_details'] = {'k': sae_cfg['k']}
  metadata['dictlearn'] = common.dictlearn_block(snapshot, site, model)
  cfg = {'d_in': int(params['W_enc'].shape[0]), 'd_sae': int(params['W_enc'].shape[1]),
         'dtype': np.dtype(dtype).name, 'device': 'cpu', 'apply_b_dec_to_input': apply_b_dec,
         'normalize_activations': 'none', 'reshape_activations': 'none', 'metadata': metadata}
  if saelens_arch == 'topk':
    cfg.update(k=sae_cfg['k'], rescale_acts_by_decoder_norm=False)
  cfg['architecture'] = saelens_arch
  return cfg, weights


def export(workdir: str, out: str, *, step: int | None = None,
           model_name: str | None = None) -> str:
  """Writes a run's checkpoint as a SAELens directory `out` (created; must not exist).

  Args:
    workdir: the dictlearn run directory.
    out: the directory to create.
    step: checkpoint step (default: the latest).
    model_name: metadata.model_name (default: the model its store names).

  Returns:
    `out`, absolute.
  """
  snapshot = common.read_snapshot(workdir, step)
  cfg, weights = to_saelens(snapshot, model_name=model_name)
  out = os.path.abspath(out)
  with common.new_directory(out) as tmp:
    safetensors_np.save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
                             os.path.join(tmp, WEIGHTS_FILE))
    block = cfg['metadata']['dictlearn']
    recovered = _params_from_block(block, weights)
    block['exact'] = exact.write_exact(tmp, WEIGHTS_FILE, snapshot.params, recovered)
    with open(os.path.join(tmp, CFG_FILE), 'w') as f:
      json.dump(cfg, f, indent=1)
  logging.info('exported %s step %d as SAELens %s to %s', snapshot.architecture,
               snapshot.step, cfg['architecture'], out)
  return out


# ---- reading a SAELens directory ------------------------------------------------


def _version(cfg):
  text = cfg.get('sae_lens_version') or (cfg.get('metadata') or {}).get('sae_lens_version')
  try:
    return int(str(text).split('.')[0]), text
  except ValueError:
    return None, text


def _from_pre_6(cfg: dict) -> dict:
  """A sae-lens < 6 config in 6.x form (what sae_lens's handle_pre_6_0_config does)."""
  renames = {'hook_point': 'hook_name', 'hook_point_head_index': 'hook_head_index',
             'activation_fn_str': 'activation_fn'}
  cfg = {renames.get(k, k): v for k, v in cfg.items()}
  out = {k: v for k, v in cfg.items() if k not in _METADATA_KEYS}
  out['metadata'] = {k: cfg[k] for k in _METADATA_KEYS if k in cfg}
  out.setdefault('apply_b_dec_to_input', True)
  out.setdefault('architecture', 'standard')
  if cfg.get('activation_fn') == 'topk' and (cfg.get('activation_fn_kwargs') or {}).get('k'):
    out['architecture'], out['k'] = 'topk', cfg['activation_fn_kwargs']['k']
  norm = cfg.get('normalize_activations')
  out['normalize_activations'] = ('expected_average_only_in' if norm is True else
                                  'none' if norm in (None, False) else norm)
  out.setdefault('reshape_activations',
                 'hook_z' if 'hook_z' in (cfg.get('hook_name') or '') else 'none')
  return out


def read_directory(sae_dir: str) -> tuple[dict, dict]:
  """(cfg in 6.x form, weights) of a SAELens directory, checked field by field.

  Raises:
    FileNotFoundError: cfg.json or sae_weights.safetensors missing.
    ValueError: an unknown format version, an architecture or option dictlearn does
      not have, or weights whose names or shapes are not the config's.
  """
  paths = [os.path.join(sae_dir, name) for name in (CFG_FILE, WEIGHTS_FILE)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'{sae_dir} is not a SAELens SAE directory: missing '
                            f'{", ".join(missing)} (expected {CFG_FILE} and {WEIGHTS_FILE})')
  with open(paths[0]) as f:
    cfg = json.load(f)
  major, text = _version(cfg)
  if major is None or major < 6:
    cfg = _from_pre_6(cfg)
  elif major > 6:
    raise ValueError(f'{paths[0]}: written by sae-lens {text}; this reader follows the 6.x '
                     f'format (sae-lens {SAELENS_VERSION})')
  where = paths[0]
  arch = cfg.get('architecture')
  if arch not in FROM_SAELENS:
    raise ValueError(f'{where}: architecture {arch!r} has no dictlearn counterpart; expected '
                     f'one of {sorted(FROM_SAELENS)}')
  if cfg.get('reshape_activations', 'none') != 'none':
    raise ValueError(f"{where}: reshape_activations={cfg['reshape_activations']!r}; dictlearn "
                     "reads whole activation rows (expected 'none')")
  if (cfg.get('metadata') or {}).get('hook_head_index') is not None:
    raise ValueError(f'{where}: hook_head_index is set; dictlearn has no per-head sites '
                     '(expected null)')
  if cfg.get('dtype') not in _DTYPES and cfg.get('dtype') not in _WIDENED:
    raise ValueError(f"{where}: dtype {cfg.get('dtype')!r}; expected one of "
                     f'{sorted(_DTYPES) + list(_WIDENED)}')
  weights = safetensors_np.load_file(paths[1])
  if 'scaling_factor' in weights:
    if not np.all(weights['scaling_factor'] == 1):
      raise ValueError(f'{paths[1]}: a finetuning scaling_factor other than 1; dictlearn has '
                       'no such parameter')
    del weights['scaling_factor']
  _check_weights(cfg, weights, paths[1])
  return cfg, weights


def _check_weights(cfg, weights, where):
  d_in, d_sae = int(cfg['d_in']), int(cfg['d_sae'])
  shapes = {'W_enc': (d_in, d_sae), 'b_enc': (d_sae,), 'W_dec': (d_sae, d_in), 'b_dec': (d_in,)}
  if cfg['architecture'] == 'jumprelu':
    shapes['log_threshold' if 'log_threshold' in weights else 'threshold'] = (d_sae,)
  if set(weights) != set(shapes):
    raise ValueError(f"{where}: a {cfg['architecture']} SAE has weights {sorted(shapes)}, "
                     f'found {sorted(weights)}')
  for name, shape in shapes.items():
    if weights[name].shape != shape:
      raise ValueError(f'{where}: {name} has shape {weights[name].shape}, expected {shape} '
                       f'(d_in={d_in}, d_sae={d_sae} in {CFG_FILE})')


# ---- import -----------------------------------------------------------------------


def _log_threshold(threshold, dtype):
  theta = np.asarray(threshold, np.float64)
  with np.errstate(divide='ignore'):
    return np.where(theta > 0, np.log(np.maximum(theta, 1e-300)), -np.inf).astype(dtype)


def _params_from_block(block: dict, weights: dict) -> dict:
  """dictlearn's parameters from the weights of one of its exports (before EXACT_FILE)."""
  params = exact.unfold_scale({k: weights[k] for k in _BASE_KEYS}, block['run']['data_scale'])
  if block['architecture'] == 'jumprelu':
    params['log_threshold'] = _log_threshold(weights['threshold'], weights['W_enc'].dtype)
  return params


def _from_block(cfg: dict, weights: dict, sae_dir: str) -> tuple[common.Snapshot, str, str]:
  """The snapshot a dictlearn export was written from, with its site and model."""
  where = os.path.join(sae_dir, CFG_FILE)
  block = common.check_block(cfg['metadata']['dictlearn'], where)
  arch = block['architecture']
  if TO_SAELENS.get(arch, (None,))[0] != cfg['architecture']:
    raise ValueError(f"{where}: architecture {cfg['architecture']!r} is not the SAELens form "
                     f'of the dictlearn {arch!r} its metadata names')
  params_like, buffers_like = common.abstract_sae(block['config'], block['run']['d_model'])
  dtype = params_like['W_enc'].dtype
  weights = {k: v.astype(dtype) for k, v in weights.items()}
  params = exact.read_exact(sae_dir, WEIGHTS_FILE, block['exact'],
                            _params_from_block(block, weights))
  snapshot = common.Snapshot(block['config'], block['run'], block['step'], params,
                             common.buffers_from_block(block, buffers_like))
  return snapshot, block['site'], block['model']


def _dtype(cfg, where):
  name = cfg['dtype']
  if name in _WIDENED:
    logging.warning('%s: dtype %s is read as float32 (dictlearn keeps float32 or bfloat16)',
                    where, name)
    return np.dtype(np.float32)
  return np.dtype(_DTYPES[name])


def _foreign(cfg: dict, weights: dict, sae_dir: str, base_config, norm_scaling_factor):
  """A snapshot of an SAE SAELens wrote (see the module docstring for the mapping)."""
  where = os.path.join(sae_dir, CFG_FILE)
  metadata = cfg.get('metadata') or {}
  norm = cfg.get('normalize_activations', 'none')
  if norm == 'expected_average_only_in':
    if norm_scaling_factor is None:
      raise ValueError(f"{where}: normalize_activations='expected_average_only_in' needs the "
                       "release's norm scaling factor (sae_lens pretrained_saes.yaml); pass "
                       '--norm_scaling_factor, or save the SAE from SAE.from_pretrained, which '
                       'folds it')
    data_scale = float(norm_scaling_factor)
  elif norm == 'none':
    if norm_scaling_factor is not None:
      raise ValueError(f"{where}: normalize_activations='none' (the weights take raw "
                       'activations); --norm_scaling_factor does not apply')
    data_scale = 1.0
  else:
    raise ValueError(f'{where}: normalize_activations={norm!r}; dictlearn scales activations '
                     "by one factor (expected 'none' or 'expected_average_only_in')")
  dtype = _dtype(cfg, where)
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  apply_b_dec = bool(cfg.get('apply_b_dec_to_input', True))
  arch, k, buffers = FROM_SAELENS[cfg['architecture']], None, {}
  extra = {}
  if cfg['architecture'] == 'topk':
    k = int(cfg['k'])
    if cfg.get('rescale_acts_by_decoder_norm'):
      norms = np.linalg.norm(w['W_dec'], axis=1)
      w['W_enc'], w['b_enc'], w['W_dec'] = (w['W_enc'] * norms, w['b_enc'] * norms,
                                            w['W_dec'] / norms[:, None])
    if not apply_b_dec:
      w['b_enc'] = w['b_enc'] + w['b_dec'] @ w['W_enc']
  elif cfg['architecture'] == 'jumprelu':
    theta = w.pop('threshold') if 'threshold' in w else np.exp(w.pop('log_threshold'))
    details = metadata.get('training_architecture_details') or {}
    k_trained = details.get('k')
    if (apply_b_dec and metadata.get('training_architecture') == 'batchtopk'
        and np.all(theta == theta[0]) and k_trained is not None
        and float(k_trained).is_integer()):
      arch, k = 'batchtopk', int(k_trained)
      buffers = {'threshold': np.asarray(theta[0], np.float32),
                 'selection_floor': np.zeros((), np.float32)}
    else:
      if apply_b_dec:
        w['b_enc'] = w['b_enc'] - w['b_dec'] @ w['W_enc']
      extra['log_threshold'] = _log_threshold(theta, dtype)
  elif apply_b_dec:  # standard
    w['b_enc'] = w['b_enc'] - w['b_dec'] @ w['W_enc']
  params = {name: w[name].astype(dtype) for name in _BASE_KEYS}
  params.update(extra)
  d_in, d_sae = int(cfg['d_in']), int(cfg['d_sae'])
  config = common.imported_config(base_config, architecture=arch, n_latents=d_sae,
                                  d_model=d_in, k=k, param_dtype=dtype.name, store=None)
  site, model = metadata.get('hook_name'), metadata.get('model_name')
  run_info = {'store': None, 'd_model': d_in, 'data_scale': data_scale, 'site': site,
              'model': model}
  return common.Snapshot(config, run_info, 0, params, buffers), site, None


def import_saelens(sae_dir: str, workdir: str, *, store: str | None = None,
                   base_config: ml_collections.ConfigDict | None = None,
                   norm_scaling_factor: float | None = None) -> str:
  """Writes a SAELens SAE directory as a dictlearn run in `workdir`.

  Args:
    sae_dir: a directory with cfg.json and sae_weights.safetensors.
    workdir: the run directory (must not hold checkpoints yet).
    store: an activation store to attach (its site and width must be the SAE's);
      without one, a dictlearn export keeps the store it was trained on and any
      other SAE has none (tools that need one say so).
    base_config: the config giving the fields a SAELens file does not carry;
      needed unless the directory is a dictlearn export.
    norm_scaling_factor: for normalize_activations 'expected_average_only_in'.

  Returns:
    The checkpoint directory written.
  """
  cfg, weights = read_directory(sae_dir)
  if 'dictlearn' in (cfg.get('metadata') or {}):
    snapshot, site, model = _from_block(cfg, weights, sae_dir)
    if norm_scaling_factor is not None:
      raise ValueError(f'{sae_dir} is a dictlearn export (its scale is folded in); '
                       '--norm_scaling_factor does not apply')
  else:
    if base_config is None:
      raise ValueError(f'{sae_dir} was not written by dictlearn: a base config (--config, an '
                       'experiment file such as experiments/base.py) must give the fields its '
                       'files do not carry (optimizer, batch, held-out rows)')
    snapshot, site, model = _foreign(cfg, weights, sae_dir, base_config, norm_scaling_factor)
  if store is not None:
    snapshot = common.attach_store(snapshot, store, site=site, model=model)
  return common.write_snapshot(snapshot, workdir, where=sae_dir)


def main(argv=None) -> int:
  parser, export_args, import_args = common.make_parser(
      'python -m dictlearn.interop.saelens', 'Export to or import from SAELens.',
      'a SAELens SAE (cfg.json + sae_weights.safetensors)')
  export_args.add_argument('--model_name', default=None,
                           help="metadata.model_name (default: the store's model)")
  import_args.add_argument('--norm_scaling_factor', type=float, default=None,
                           help="for normalize_activations='expected_average_only_in'")

  def run(args):
    if args.action == 'export':
      print(export(args.workdir, args.out, step=args.step, model_name=args.model_name))
    else:
      print(import_saelens(args.sae_dir, args.workdir, store=args.store,
                           base_config=common.base_config_if_present(args.config),
                           norm_scaling_factor=args.norm_scaling_factor))

  return common.run_command(run, parser, argv)

if __name__ == '__main__':
  sys.exit(main())
