"""Activation store: roundtrip, resume, refusal of incomplete/mismatched/non-finite data."""
import importlib.util
import pathlib
import uuid

import ml_dtypes
import numpy as np
import pytest

from dictlearn.data import store

META = {'model': 'test-model', 'site': 'blocks.0.hook_resid_post', 'tokenizer': 'tok',
        'corpus': {'name': 'unit'}, 'extra': {'harvest': {'batch': 3}}}


def _store_path(tmp_path, scheme):
  if scheme == 'memory':
    return f'memory://{uuid.uuid4().hex}/site'
  return f'file://{tmp_path}/site'


def _rows(n, d, seed):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_kvstore_spec_maps_paths_and_urls(tmp_path):
  assert store.kvstore_spec(str(tmp_path / 'a')) == {'driver': 'file', 'path': f'{tmp_path}/a/'}
  assert store.kvstore_spec(f'file://{tmp_path}/a/') == {'driver': 'file', 'path': f'{tmp_path}/a/'}
  assert store.kvstore_spec('memory://x/y') == {'driver': 'memory', 'path': 'x/y/'}
  assert store.kvstore_spec('gs://bucket/acts/l12') == {'driver': 'gcs', 'bucket': 'bucket',
                                                        'path': 'acts/l12/'}
  assert store.kvstore_spec('s3://bucket/acts') == {'driver': 's3', 'bucket': 'bucket',
                                                    'path': 'acts/'}
  with pytest.raises(ValueError, match="unsupported scheme 'http'"):
    store.kvstore_spec('http://example.com/x')
  with pytest.raises(ValueError, match='no bucket'):
    store.kvstore_spec('gs:///x')


@pytest.mark.parametrize('scheme', ['file', 'memory'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_roundtrip(tmp_path, scheme, dtype):
  path, d = _store_path(tmp_path, scheme), 6
  x = _rows(53, d, 0)
  tokens, doc, pos = np.arange(53) + 100, np.arange(53) // 10, np.arange(53) % 10
  writer = store.StoreWriter(path, d, dtype, chunk_rows=4, shard_chunks=2, metadata=META)
  for a, b in [(0, 5), (5, 30), (30, 53)]:  # batches smaller and larger than a shard (8 rows)
    writer.append(x[a:b], tokens=tokens[a:b], doc=doc[a:b], pos=pos[a:b])
  assert writer.n_rows == 53
  manifest = writer.finish()

  reader = store.StoreReader(path, d_model=d)  # a new reader sees what the writer wrote
  expected = x.astype(store.DTYPES[dtype])
  assert (reader.n_rows, reader.d_model, reader.chunk_rows, reader.n_chunks) == (53, d, 4, 14)
  assert reader.read_rows(0, 53).dtype == expected.dtype
  np.testing.assert_array_equal(reader.read_rows(0, 53), expected)
  np.testing.assert_array_equal(reader.read_rows(17, 18), expected[17:18])
  idx = np.array([52, 0, 17, 17, 3, 40])
  np.testing.assert_array_equal(reader.read_indices(idx, max_chunks_at_once=2), expected[idx])
  np.testing.assert_array_equal(reader.read_tokens(0, 53), tokens)
  np.testing.assert_array_equal(reader.read_doc(10, 20), doc[10:20])
  np.testing.assert_array_equal(reader.read_pos(0, 53), pos)
  assert reader.layout()['array_shape'] == [53, d]

  assert reader.manifest == manifest
  for key in ('model', 'site', 'tokenizer', 'corpus', 'extra'):
    assert manifest[key] == META[key]
  assert (manifest['d_model'], manifest['dtype'], manifest['n_tokens'], manifest['chunk_rows'],
          manifest['writer_version']) == (d, dtype, 53, 4, store.WRITER_VERSION)
  stats, x64 = manifest['statistics'], expected.astype(np.float64)
  assert stats['count'] == 53
  np.testing.assert_allclose(stats['mean_sq_norm'], (x64 ** 2).sum(1).mean(), rtol=1e-6)
  np.testing.assert_allclose(stats['mean_norm'], np.linalg.norm(x64, axis=1).mean(), rtol=1e-6)
  np.testing.assert_allclose(stats['mean'], x64.mean(0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(stats['norm_of_mean'], np.linalg.norm(x64.mean(0)), rtol=1e-6)
  with pytest.raises(IndexError, match='out of range'):
    reader.read_rows(50, 54)


def test_missing_columns_default_to_minus_one(tmp_path):
  path = _store_path(tmp_path, 'memory')
  writer = store.StoreWriter(path, 3, metadata={'model': 'synthetic', 'site': 'synthetic'})
  writer.append(_rows(5, 3, 1))
  writer.finish()
  reader = store.StoreReader(path)
  np.testing.assert_array_equal(reader.read_tokens(0, 5), -np.ones(5))
  assert reader.manifest['tokenizer'] is None and reader.manifest['extra'] == {}


@pytest.mark.parametrize('scheme', ['file', 'memory'])
def test_resume_across_reopen_and_after_kill(tmp_path, scheme):
  path, d = _store_path(tmp_path, scheme), 4
  x = _rows(60, d, 2)
  w = store.StoreWriter(path, d, chunk_rows=4, shard_chunks=2, metadata=META)
  w.append(x[:10])  # commits the first full shard (8 rows), buffers 2
  assert (w.n_rows, w.n_committed) == (10, 8)
  w.flush()
  assert w.n_committed == 10
  del w  # closed cleanly after a flush

  w = store.StoreWriter(path, d, metadata=META)
  assert (w.n_rows, w.chunk_rows) == (10, 4)
  w.append(x[10:29])  # commits through row 24; rows 24..28 only buffered
  del w  # killed: no flush, no finish

  with pytest.raises(store.IncompleteStoreError) as err:
    store.StoreReader(path)
  assert str(err.value) == (f'store at {path} is incomplete: manifest.json missing; 24 rows '
                            'written so far; finish the harvest/writer or resume it')
  partial = store.StoreReader(path, allow_incomplete=True)
  assert (partial.complete, partial.n_rows, partial.manifest) == (False, 24, None)
  np.testing.assert_array_equal(partial.read_rows(0, 24), x[:24])

  w = store.StoreWriter(path, d, metadata=META)
  assert w.n_rows == 24  # the caller resumes its source at row 24
  w.append(x[24:60])
  manifest = w.finish()
  reader = store.StoreReader(path)
  assert reader.n_rows == 60
  np.testing.assert_array_equal(reader.read_rows(0, 60), x)
  np.testing.assert_allclose(manifest['statistics']['mean_sq_norm'],
                             (x.astype(np.float64) ** 2).sum(1).mean(), rtol=1e-6)


def test_rows_past_the_last_commit_are_overwritten_and_trimmed(tmp_path):
  path, d = _store_path(tmp_path, 'file'), 3
  x, y = _rows(40, d, 3), _rows(40, d, 4)
  w = store.StoreWriter(path, d, chunk_rows=4, shard_chunks=2, metadata=META)
  w.append(x[:8])

  def crash():
    raise OSError('killed before progress.json')

  w._write_progress = crash  # data of rows 8..23 lands, its commit does not
  with pytest.raises(OSError):
    w.append(x[8:24])
  w = store.StoreWriter(path, d, metadata=META)
  assert w.n_rows == 8
  w.append(y[8:12])  # fewer rows than were left behind by the killed writer
  w.finish()
  reader = store.StoreReader(path)
  assert reader.n_rows == 12 and reader.layout()['array_shape'] == [12, d]
  np.testing.assert_array_equal(reader.read_rows(0, 12), np.concatenate([x[:8], y[8:12]]))
  assert reader.manifest['statistics']['count'] == 12


def test_refuses_missing_incomplete_and_mismatched_stores(tmp_path):
  path = _store_path(tmp_path, 'file')
  with pytest.raises(FileNotFoundError, match=f'no activation store at {path}'):
    store.StoreReader(path)
  w = store.StoreWriter(path, 8, 'bfloat16', chunk_rows=4, metadata=META)
  with pytest.raises(store.IncompleteStoreError, match='0 rows written so far'):
    store.StoreReader(path)
  with pytest.raises(ValueError) as err:
    store.StoreWriter(path, 6, 'float32', metadata=META)
  assert 'd_model=8, dtype=bfloat16' in str(err.value)
  assert 'd_model=6, dtype=float32' in str(err.value)
  with pytest.raises(ValueError, match='chunk_rows=4; reopened with chunk_rows=8'):
    store.StoreWriter(path, 8, 'bfloat16', chunk_rows=8, metadata=META)
  w.append(_rows(4, 8, 5))
  w.finish()
  with pytest.raises(ValueError) as err:
    store.StoreReader(path, d_model=6)
  assert str(err.value) == f'store at {path} has d_model=8, expected 6'


def test_non_finite_rows_refused_and_earlier_rows_kept(tmp_path):
  path, d = _store_path(tmp_path, 'memory'), 4
  good, bad = _rows(10, d, 6), _rows(5, d, 7)
  bad[3, 1] = np.nan
  w = store.StoreWriter(path, d, chunk_rows=4, shard_chunks=1, metadata=META)
  w.append(good)
  with pytest.raises(ValueError, match=r'row 3 of the batch \(store row 13\) is not finite'):
    w.append(bad)
  big = np.full((2, d), 3.4e38, np.float32)  # finite in float32, inf once stored as bfloat16
  w2 = store.StoreWriter(_store_path(tmp_path, 'memory'), d, 'bfloat16', metadata=META)
  with pytest.raises(ValueError, match=r'row 0 of the batch \(store row 0\)'):
    w2.append(big)
  assert w.n_rows == 10
  w.finish()
  reader = store.StoreReader(path)
  np.testing.assert_array_equal(reader.read_rows(0, reader.n_rows), good)


def test_finish_is_final(tmp_path):
  path = _store_path(tmp_path, 'memory')
  w = store.StoreWriter(path, 2, metadata=META)
  w.append(np.ones((3, 2)))
  w.finish()
  with pytest.raises(ValueError, match='finish\\(\\) was called twice'):
    w.finish()
  with pytest.raises(ValueError, match='append after finish'):
    w.append(np.ones((1, 2)))
  with pytest.raises(ValueError, match='is finished'):
    store.StoreWriter(path, 2, metadata=META)


def test_bad_arguments(tmp_path):
  path = _store_path(tmp_path, 'memory')
  with pytest.raises(ValueError, match=r"unknown: \['modle'\]"):
    store.StoreWriter(path, 2, metadata={'modle': 'x', 'site': 's', 'model': 'm'})
  with pytest.raises(ValueError, match=r"missing or not a string: \['site'\]"):
    store.StoreWriter(path, 2, metadata={'model': 'm'})
  with pytest.raises(ValueError, match="dtype 'float16' is not one of"):
    store.StoreWriter(path, 2, 'float16', metadata=META)
  w = store.StoreWriter(path, 2, metadata=META)
  with pytest.raises(ValueError, match=r'shape \[n, 2\], got \[3, 3\]'):
    w.append(np.ones((3, 3)))
  with pytest.raises(ValueError, match=r'tokens must have shape \[3\], got \[2\]'):
    w.append(np.ones((3, 2)), tokens=[1, 2])


def test_default_chunk_rows_is_about_two_mib():
  assert store.default_chunk_rows(576, 'float32') == 1024
  assert store.default_chunk_rows(64, 'bfloat16') == 16384
  assert ml_dtypes.bfloat16 == store.DTYPES['bfloat16']


def test_inspect_tool_reads_complete_and_incomplete_stores(tmp_path, capsys):
  tool_file = pathlib.Path(__file__).parents[1] / 'tools' / 'inspect_store.py'
  spec = importlib.util.spec_from_file_location('inspect_store', tool_file)  # a script, not a module
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  path = _store_path(tmp_path, 'file')
  w = store.StoreWriter(path, 4, chunk_rows=4, shard_chunks=2, metadata=META)
  w.append(_rows(11, 4, 8), tokens=np.arange(11))
  info = tool.describe(path, sample_rows=5)
  assert (info['complete'], info['n_rows'], info['progress']['n_rows']) == (False, 8, 8)
  assert info['columns_present'] == {'tokens': True, 'doc': False, 'pos': False}
  w.finish()
  tool.main([path])
  out = capsys.readouterr().out
  assert 'complete' in out and 'rows        11' in out and 'sharding_indexed' in out
  info = tool.describe(path, sample_rows=100)
  assert info['bytes_on_disk'] > 11 * 4 * 4 and info['sample_statistics']['rows'] == 11
  np.testing.assert_allclose(info['sample_statistics']['mean_sq_norm'],
                             info['manifest_statistics']['mean_sq_norm'], rtol=1e-6)
