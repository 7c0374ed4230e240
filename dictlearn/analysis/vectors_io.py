"""Saved vectors (steering vectors, concept vectors, directions): one format, one place.

A vector file is a safetensors file: every tensor is a named float32 vector,
(d_model,) or (n_positions, d_model) (an ActAdd prompt difference), and the
safetensors metadata (strings) hold what the vectors mean:

    format      'dictlearn.vectors'
    version     '1'
    site        the hook site the vectors were read at (and are meant for)
    model       JSON of `model_identity`: name, n_layers, d_model, vocab_size,
                and file and sha256 when the model came from a file
    provenance  JSON, free form: how the vectors were made (method, texts or
                prompts, layer, date, the command)

Loading checks the format, that every vector is d_model wide, and, given the
model at hand, that the file was made with the same model (name, shape, and the
file's SHA-256 when both sides know it); each mismatch is an error naming the
field, what the file holds and what was expected.
"""
import json
import os
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np
from safetensors import numpy as st_numpy
import safetensors

from dictlearn import files
from dictlearn.lm import llama

FORMAT = 'dictlearn.vectors'
VERSION = '1'
_IDENTITY_FIELDS = ('name', 'n_layers', 'd_model', 'vocab_size')


class SavedVectors(NamedTuple):
  """The contents of a vector file."""
  vectors: dict  # name -> float32 np.ndarray, (d_model,) or (n, d_model)
  site: str
  model: dict  # see model_identity
  provenance: dict


def model_identity(cfg: llama.LlamaConfig, path: Optional[str] = None) -> dict:
  """What names a model in a vector file: its config's name and shape, and its file.

  Args:
    cfg: the model's config.
    path: the model file (a GGUF) when there is one: its base name and SHA-256
      are recorded too.
  """
  identity = {'name': cfg.name, 'n_layers': cfg.n_layers, 'd_model': cfg.d_model,
              'vocab_size': cfg.vocab_size}
  if path is not None and os.path.isfile(path):
    identity.update(file=os.path.basename(path), sha256=files.sha256(path))
  return identity


def check_model(saved: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
  """Raises ValueError when `saved` (a model identity) is not the `expected` model.

  The name and shape fields must agree; the SHA-256 is compared when both have it.
  """
  for field in _IDENTITY_FIELDS + ('sha256',):
    if field == 'sha256' and not (saved.get(field) and expected.get(field)):
      continue
    if saved.get(field) != expected.get(field):
      raise ValueError(
          f'{what} was made with another model: its {field} is {saved.get(field)!r}, the model '
          f'here has {expected.get(field)!r} (file: {saved}; expected: {dict(expected)}).')


def save_vectors(path: str, vectors: Mapping[str, Any], *, site: str, model: Mapping[str, Any],
                 provenance: Mapping[str, Any]) -> str:
  """Writes named vectors read at `site` of `model` (see the module docstring).

  Args:
    path: the file to write (conventionally `.safetensors`).
    vectors: name -> array (d_model,) or (n_positions, d_model).
    site: the hook site they belong to.
    model: `model_identity(cfg, path)` of the model they came from.
    provenance: how they were made (JSON-serialisable).

  Returns:
    path.

  Raises:
    ValueError: no vectors, or a vector that is not d_model wide or not 1-D/2-D.
  """
  if not vectors:
    raise ValueError(f'save_vectors({path!r}) got no vectors; expected at least one name -> array.')
  llama.parse_site(site, model['n_layers'])
  tensors = {}
  for name, vector in vectors.items():
    array = np.ascontiguousarray(np.asarray(vector, np.float32))
    if array.ndim not in (1, 2) or array.shape[-1] != model['d_model']:
      raise ValueError(f'vector {name!r} has shape {array.shape}; expected (d_model,) or '
                       f'(n_positions, d_model) with d_model = {model["d_model"]}.')
    tensors[name] = array
  metadata = {'format': FORMAT, 'version': VERSION, 'site': site,
              'model': json.dumps(dict(model), sort_keys=True),
              'provenance': json.dumps(dict(provenance), sort_keys=True, default=str)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  st_numpy.save_file(tensors, path, metadata=metadata)
  return path


def load_vectors(path: str, model: Optional[Mapping[str, Any]] = None) -> SavedVectors:
  """Reads a vector file; with `model` (a `model_identity`), checks it was made with that model.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not a dictlearn vector file, a vector of the wrong width, or
      (given `model`) vectors made with another model.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no vector file at {path}')
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      metadata = f.metadata() or {}
      vectors = {name: f.get_tensor(name) for name in f.keys()}
  except safetensors.SafetensorError as e:
    raise ValueError(f'{path} is not a safetensors file ({e}); expected a dictlearn vector '
                     'file written by dictlearn.analysis.vectors_io.save_vectors') from e
  if metadata.get('format') != FORMAT:
    raise ValueError(f'{path} is not a dictlearn vector file: its metadata format is '
                     f'{metadata.get("format")!r}, expected {FORMAT!r}.')
  if metadata.get('version') != VERSION:
    raise ValueError(f'{path} has vector-file version {metadata.get("version")!r}; this '
                     f'dictlearn reads version {VERSION!r}.')
  saved = SavedVectors(vectors, metadata['site'], json.loads(metadata['model']),
                       json.loads(metadata['provenance']))
  for name, vector in vectors.items():
    if vector.ndim not in (1, 2) or vector.shape[-1] != saved.model['d_model']:
      raise ValueError(f'{path}: vector {name!r} has shape {vector.shape}; the file says '
                       f'd_model = {saved.model["d_model"]}.')
  if model is not None:
    check_model(saved.model, model, f'the vector file {path}')
  return saved
