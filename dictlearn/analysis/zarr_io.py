"""Small local zarr3 arrays (TensorStore) and atomic JSON files for analysis outputs."""
import json
import os

import numpy as np
import tensorstore as ts

from dictlearn.data import store as store_lib


def _spec(path):
  return {'driver': 'zarr3', 'kvstore': store_lib.kvstore_spec(path)}


def create(path, shape, dtype, chunk_rows, fill_value=0):
  """Creates (replacing) a zarr3 array chunked along its first axis; returns its handle."""
  shape = [int(s) for s in shape]
  chunk = [max(1, min(int(chunk_rows), shape[0]))] + shape[1:]
  spec = dict(_spec(path), metadata={
      'shape': shape, 'data_type': np.dtype(dtype).name,
      'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': chunk}},
      'fill_value': fill_value,
      'codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                 {'name': 'zstd', 'configuration': {'level': 1}}]})
  return ts.open(spec, create=True, delete_existing=True, context=store_lib.CONTEXT).result()


def open_array(path):
  """Opens an existing array.

  Raises:
    FileNotFoundError: no array at `path`.
  """
  try:
    return ts.open(_spec(path), open=True, context=store_lib.CONTEXT).result()
  except ValueError as e:
    if 'NOT_FOUND' not in str(e):
      raise
    raise FileNotFoundError(f'no array at {path}') from e


def write(path, array, chunk_rows=4096):
  """Writes a whole numpy array as a new zarr3 array."""
  array = np.ascontiguousarray(array)
  create(path, array.shape, array.dtype, chunk_rows).write(array).result()


def read(path):
  """Reads a whole array into numpy."""
  return np.asarray(open_array(path).read().result())


def write_json(path, value):
  """Writes JSON atomically (a temporary file renamed over the target)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def read_json(path):
  """The JSON at `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)
