"""Folding dictlearn's activation scale into exported weights, and undoing it exactly.

dictlearn trains on x * data_scale and divides its reconstructions by data_scale;
the peers' files describe a function of the raw activations. Exports fold the
factor into the weights exactly as SAELens's own trainer folds its normalisation
(`fold_scale`: W_enc * s, W_dec / s, b_dec / s; pre-activations, thresholds and
top-k choices are unchanged), and imports of a dictlearn export unfold it.

Folding rounds (about one float32 weight in ten moves by one ulp), so to keep
dictlearn -> file -> dictlearn exact an export also writes `EXACT_FILE`: for
every array the import would not recover bit for bit, its difference in units in
the last place (int8), or the array itself when that does not fit. It is used
only while the weights file is the one it was written for (its SHA-256 is
recorded in the export's config); the peers ignore it.
"""
import logging
import os

import numpy as np
from safetensors import numpy as safetensors_np

from dictlearn import files

EXACT_FILE = 'dictlearn_exact.safetensors'
_ULP = '.ulp'  # key suffix of a residual stored in units in the last place
_SIGNED = {2: np.int16, 4: np.int32, 8: np.int64}


def fold_scale(params: dict, scale: float) -> dict:
  """W_enc * s, W_dec / s, b_dec / s (in float64, rounded once to each dtype)."""
  s = np.float64(scale)
  out = dict(params)
  out['W_enc'] = (params['W_enc'].astype(np.float64) * s).astype(params['W_enc'].dtype)
  for name in ('W_dec', 'b_dec'):
    out[name] = (params[name].astype(np.float64) / s).astype(params[name].dtype)
  return out


def unfold_scale(params: dict, scale: float) -> dict:
  """The inverse of `fold_scale` (up to rounding; `apply_residual` makes it exact)."""
  return fold_scale(params, 1.0 / np.float64(scale))


def _bits(a):
  return a.view(_SIGNED[a.dtype.itemsize]).astype(np.int64)


def exact_residual(original: dict, recovered: dict) -> dict:
  """What turns `recovered` into `original` bit for bit (see the module docstring).

  Args:
    original, recovered: name -> array with the same names.

  Returns:
    name + '.ulp' -> int8 differences in units in the last place, or name -> the
    original array; names recovered exactly are left out.
  """
  out = {}
  for name, want in original.items():
    want, got = np.asarray(want), np.asarray(recovered[name])
    if want.dtype != got.dtype or want.shape != got.shape:
      out[name] = want
      continue
    diff = _bits(want) - _bits(got)
    if not diff.any():
      continue
    if np.all(np.signbit(want) == np.signbit(got)) and np.abs(diff).max() <= 127:
      out[name + _ULP] = diff.astype(np.int8)
    else:
      out[name] = want
  return out


def apply_residual(recovered: dict, residual: dict) -> dict:
  """`recovered` with `exact_residual`'s corrections applied."""
  out = dict(recovered)
  for key, value in residual.items():
    if key.endswith(_ULP):
      name = key[:-len(_ULP)]
      got = np.asarray(out[name])
      signed = _SIGNED[got.dtype.itemsize]
      out[name] = (got.view(signed) + value.astype(signed)).view(got.dtype)
    else:
      out[key] = value
  return out


def write_exact(directory: str, weights_file: str, original: dict, recovered: dict) -> dict:
  """Writes EXACT_FILE into `directory` when needed; returns the block's 'exact' entry."""
  residual = exact_residual(original, recovered)
  if residual:
    safetensors_np.save_file({k: np.ascontiguousarray(v) for k, v in residual.items()},
                             os.path.join(directory, EXACT_FILE))
  return {'file': EXACT_FILE if residual else None,
          'weights_sha256': files.sha256(os.path.join(directory, weights_file))}


def read_exact(directory: str, weights_file: str, exact: dict, recovered: dict) -> dict:
  """`recovered` made exact with the directory's EXACT_FILE, when it still applies."""
  if not exact['file']:
    return recovered
  path = os.path.join(directory, exact['file'])
  if not os.path.exists(path):
    logging.warning('%s is missing: the import is exact only up to the rounding of the '
                    'activation scale folded into the weights', path)
    return recovered
  if files.sha256(os.path.join(directory, weights_file)) != exact['weights_sha256']:
    logging.warning('%s changed since dictlearn exported it: %s is ignored and the weights '
                    'are read as they are now', weights_file, exact['file'])
    return recovered
  return apply_residual(recovered, safetensors_np.load_file(path))
