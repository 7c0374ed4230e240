"""EleutherAI sparsify's on-disk format: import a sparsify SAE, export a dictlearn TopK.

    python -m dictlearn.interop.sparsify import SAE_DIR --workdir DIR [--store PATH]
        [--site blocks.N.hook_resid_post] [--config EXPERIMENT]
    python -m dictlearn.interop.sparsify export --workdir DIR --out SAE_DIR [--step N]

The format is eai-sparsify 1.3.3's (`SparseCoder.save_to_disk` / `load_from_disk`),
one directory per hookpoint: `cfg.json` (the SparseCoderConfig fields activation,
expansion_factor, normalize_decoder, num_latents, k, multi_topk, skip_connection,
transcode, and d_in) beside `sae.safetensors` (encoder.weight [num_latents, d_in],
encoder.bias [num_latents], W_dec [num_latents, d_in], b_dec [d_in]; the dtype is
the tensors').

sparsify's SAE is dictlearn's TopK: top-k of ReLU((x - b_dec) W^T + b) (the
same set and values as ReLU of the top k), decoded as the sum of the chosen rows
of W_dec plus b_dec. So only `activation: topk` without a skip connection or a
transcoder imports, and only dictlearn's topk exports; multi_topk changes only
sparsify's training loss. sparsify trains on raw activations: an import has
data_scale 1, and an export folds dictlearn's data_scale into the weights
(`exact.fold_scale`), with the `dictlearn` block (an extra cfg.json key, which
sparsify's loader drops) and `exact.EXACT_FILE` making the round trip exact.

sparsify names sites by the Hugging Face module (`layers.12`, the output of
block 12, is TransformerLens's `blocks.12.hook_resid_post`); the directory name
is mapped that way when `--site` is not given (`HF_SITES`).
"""
import json
import logging
import os
import re
import sys

import ml_collections
import numpy as np
from safetensors import numpy as safetensors_np

from dictlearn.interop import common
from dictlearn.interop import exact

SPARSIFY_VERSION = '1.3.3'  # the eai-sparsify whose format this module follows
CFG_FILE = 'cfg.json'
WEIGHTS_FILE = 'sae.safetensors'
# Hugging Face module (sparsify's hookpoint) -> TransformerLens site of its output.
HF_SITES = ((re.compile(r'^(?:model\.)?layers\.(\d+)$'), 'blocks.{}.hook_resid_post'),
            (re.compile(r'^(?:model\.)?layers\.(\d+)\.mlp$'), 'blocks.{}.hook_mlp_out'),
            (re.compile(r'^(?:model\.)?layers\.(\d+)\.self_attn$'), 'blocks.{}.hook_attn_out'))
_CFG_FIELDS = ('activation', 'expansion_factor', 'normalize_decoder', 'num_latents', 'k',
               'multi_topk', 'skip_connection', 'transcode')
_DTYPES = ('float32', 'bfloat16')


def site_of_hookpoint(name: str) -> str | None:
  """The TransformerLens site of a sparsify hookpoint name, or None when not known."""
  for pattern, site in HF_SITES:
    match = pattern.match(name)
    if match:
      return site.format(match.group(1))
  return None


def to_sparsify(snapshot: common.Snapshot) -> tuple[dict, dict]:
  """(cfg.json dict, weights) of a dictlearn TopK checkpoint in sparsify's format."""
  if snapshot.architecture != 'topk':
    raise ValueError(f'sparsify holds TopK SAEs only; this checkpoint is '
                     f'{snapshot.architecture!r} (export it to SAELens instead)')
  p = exact.fold_scale(snapshot.params, snapshot.run_info['data_scale'])
  d_in, n = p['W_enc'].shape
  cfg = {'activation': 'topk', 'expansion_factor': max(1, n // d_in), 'normalize_decoder': True,
         'num_latents': int(n), 'k': snapshot.config['sae']['k'], 'multi_topk': False,
         'skip_connection': False, 'transcode': False, 'd_in': int(d_in)}
  weights = {'encoder.weight': p['W_enc'].T, 'encoder.bias': p['b_enc'], 'W_dec': p['W_dec'],
             'b_dec': p['b_dec']}
  return cfg, weights


def _params(weights: dict, data_scale: float) -> dict:
  params = {'W_enc': weights['encoder.weight'].T, 'b_enc': weights['encoder.bias'],
            'W_dec': weights['W_dec'], 'b_dec': weights['b_dec']}
  return exact.unfold_scale(params, data_scale)


def export(workdir: str, out: str, *, step: int | None = None) -> str:
  """Writes a run's TopK checkpoint as a sparsify directory `out` (created; must not exist)."""
  snapshot = common.read_snapshot(workdir, step)
  cfg, weights = to_sparsify(snapshot)
  site, model = common.site_and_model(snapshot)
  out = os.path.abspath(out)
  with common.new_directory(out) as tmp:
    safetensors_np.save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
                             os.path.join(tmp, WEIGHTS_FILE))
    block = common.dictlearn_block(snapshot, site, model)
    block['exact'] = exact.write_exact(tmp, WEIGHTS_FILE, snapshot.params,
                                       _params(weights, snapshot.run_info['data_scale']))
    with open(os.path.join(tmp, CFG_FILE), 'w') as f:
      json.dump(dict(cfg, dictlearn=block), f, indent=1)
  logging.info('exported topk step %d as sparsify to %s', snapshot.step, out)
  return out


def read_directory(sae_dir: str) -> tuple[dict, dict]:
  """(cfg, weights) of a sparsify directory, checked field by field.

  Raises:
    FileNotFoundError: cfg.json or sae.safetensors missing.
    ValueError: an option dictlearn does not have, or weights whose names or shapes
      are not the config's.
  """
  paths = [os.path.join(sae_dir, name) for name in (CFG_FILE, WEIGHTS_FILE)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'{sae_dir} is not a sparsify SAE directory: missing '
                            f'{", ".join(missing)} (expected {CFG_FILE} and {WEIGHTS_FILE})')
  with open(paths[0]) as f:
    cfg = json.load(f)
  absent = [k for k in _CFG_FIELDS + ('d_in',) if k not in cfg]
  if absent:
    raise ValueError(f'{paths[0]}: missing fields {absent}; a sparsify {SPARSIFY_VERSION} '
                     f'config has {list(_CFG_FIELDS) + ["d_in"]}')
  unsupported = {k: cfg[k] for k in ('skip_connection', 'transcode') if cfg[k]}
  if cfg['activation'] != 'topk' or unsupported:
    raise ValueError(f"{paths[0]}: activation={cfg['activation']!r} {unsupported or ''}; "
                     "dictlearn imports sparsify's plain TopK SAE (activation 'topk', no skip "
                     'connection, not a transcoder)')
  weights = safetensors_np.load_file(paths[1])
  d_in = int(cfg['d_in'])
  n = int(cfg['num_latents']) or d_in * int(cfg['expansion_factor'])
  shapes = {'encoder.weight': (n, d_in), 'encoder.bias': (n,), 'W_dec': (n, d_in),
            'b_dec': (d_in,)}
  if set(weights) != set(shapes):
    raise ValueError(f'{paths[1]}: expected weights {sorted(shapes)}, found {sorted(weights)}')
  for name, shape in shapes.items():
    if weights[name].shape != shape:
      raise ValueError(f'{paths[1]}: {name} has shape {weights[name].shape}, expected {shape} '
                       f'(d_in={d_in}, num_latents={n} in {CFG_FILE})')
  dtypes = {str(v.dtype) for v in weights.values()}
  if len(dtypes) != 1 or not dtypes <= set(_DTYPES):
    raise ValueError(f'{paths[1]}: tensors of dtypes {sorted(dtypes)}; expected all float32 '
                     'or all bfloat16')
  return cfg, weights


def import_sparsify(sae_dir: str, workdir: str, *, store: str | None = None,
                    site: str | None = None,
                    base_config: ml_collections.ConfigDict | None = None) -> str:
  """Writes a sparsify SAE directory as a dictlearn run in `workdir`.

  Args:
    sae_dir: a directory with cfg.json and sae.safetensors (one hookpoint).
    workdir: the run directory (must not hold checkpoints yet).
    store: an activation store to attach (its site and width must be the SAE's).
    site: the TransformerLens site the SAE reads (default: from the directory name).
    base_config: the config giving the fields sparsify's files do not carry;
      needed unless the directory is a dictlearn export.

  Returns:
    The checkpoint directory written.
  """
  cfg, weights = read_directory(sae_dir)
  where = os.path.join(sae_dir, CFG_FILE)
  if 'dictlearn' in cfg:
    block = common.check_block(cfg['dictlearn'], where)
    if block['architecture'] != 'topk':
      raise ValueError(f"{where}: the dictlearn block names {block['architecture']!r}; a "
                       'sparsify directory holds a topk SAE')
    params = exact.read_exact(sae_dir, WEIGHTS_FILE, block['exact'],
                              _params(weights, block['run']['data_scale']))
    snapshot = common.Snapshot(block['config'], block['run'], block['step'], params, {})
    site, model = site or block['site'], block['model']
  else:
    if base_config is None:
      raise ValueError(f'{sae_dir} was not written by dictlearn: a base config (--config, an '
                       'experiment file such as experiments/base.py) must give the fields its '
                       'files do not carry (optimizer, batch, held-out rows)')
    site = site or site_of_hookpoint(os.path.basename(os.path.normpath(sae_dir)))
    if site is None:
      logging.warning('%s: no --site and the directory name is not a known hookpoint; the '
                      'run records no site and a store is checked by width only', sae_dir)
    params = _params(weights, 1.0)
    d_in, n = params['W_enc'].shape
    config = common.imported_config(base_config, architecture='topk', n_latents=n,
                                    d_model=d_in, k=int(cfg['k']),
                                    param_dtype=str(params['W_enc'].dtype), store=None)
    run_info = {'store': None, 'd_model': d_in, 'data_scale': 1.0, 'site': site, 'model': None}
    snapshot = common.Snapshot(config, run_info, 0, params, {})
    model = None
  if store is not None:
    snapshot = common.attach_store(snapshot, store, site=site, model=model)
  return common.write_snapshot(snapshot, workdir, where=sae_dir)


def main(argv=None) -> int:
  parser, _, import_args = common.make_parser(
      'python -m dictlearn.interop.sparsify', 'Export to or import from EleutherAI sparsify.',
      'a sparsify SAE (cfg.json + sae.safetensors)')
  import_args.add_argument('--site', default=None,
                           help='TransformerLens site the SAE reads (default: from the '
                                'directory name, e.g. layers.12 -> blocks.12.hook_resid_post)')

  def run(args):
    if args.action == 'export':
      print(export(args.workdir, args.out, step=args.step))
    else:
      print(import_sparsify(args.sae_dir, args.workdir, store=args.store, site=args.site,
                            base_config=common.base_config_if_present(args.config)))

  return common.run_command(run, parser, argv)

if __name__ == '__main__':
  sys.exit(main())
