"""Loader: pure step -> rows, epochs, held-out rows, sharded global batches, prefetch errors."""
import uuid

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dictlearn.data import loader
from dictlearn.data import store

N_ROWS, HELDOUT, D, CHUNK = 1100, 100, 8, 16  # 1000 train rows: the last train chunk is partial


@pytest.fixture(scope='module')
def reader():
  """A store whose column 0 holds the row index, so a batch names its rows."""
  path = f'memory://{uuid.uuid4().hex}'
  x = np.random.default_rng(0).standard_normal((N_ROWS, D)).astype(np.float32)
  x[:, 0] = np.arange(N_ROWS)
  writer = store.StoreWriter(path, D, chunk_rows=CHUNK, shard_chunks=4,
                             metadata={'model': 'm', 'site': 's'})
  writer.append(x)
  writer.finish()
  return store.StoreReader(path)


def _loader(reader, **overrides):
  kw = dict(batch_size=40, seed=0, shuffle_window_chunks=4, heldout_tokens=HELDOUT, scale=1.0,
            sharding=None, prefetch=2)
  kw.update(overrides)
  return loader.Loader(reader, **kw)


def test_batch_rows_is_a_pure_function_of_seed_and_step(reader):
  with _loader(reader) as a, _loader(reader) as b, _loader(reader, seed=1) as c:
    for step in (7, 3, 0, 60, 3):  # any order, across epochs
      np.testing.assert_array_equal(a.batch_rows(step), b.batch_rows(step))
      assert a.batch_rows(step).dtype == np.int64 and a.batch_rows(step).shape == (40,)
    assert not np.array_equal(a.batch_rows(0), c.batch_rows(0))


def test_every_train_row_once_per_epoch_never_heldout(reader):
  with _loader(reader) as a:
    epochs = [np.concatenate([a.batch_rows(s) for s in range(e * 25, (e + 1) * 25)])
              for e in range(2)]
    for rows in epochs:
      np.testing.assert_array_equal(np.sort(rows), np.arange(1000))  # train rows only
    assert not np.array_equal(epochs[0], epochs[1])
    # Rows of a step mix chunks from across a window, not one chunk.
    assert len(np.unique(a.batch_rows(0) // CHUNK)) > 2
  with _loader(reader, batch_size=48) as b:  # 48 does not divide 1000: batches straddle epochs
    stream = np.concatenate([b.batch_rows(s) for s in range(63)])
    np.testing.assert_array_equal(np.sort(stream[:1000]), np.arange(1000))
    np.testing.assert_array_equal(np.sort(stream[1000:2000]), np.arange(1000))


def test_batches_hold_the_rows_and_resume_replays(reader):
  with _loader(reader) as a:
    batches = [next(a) for _ in range(30)]  # wraps into the second epoch
    assert a.step == 30
    for step, batch in enumerate(batches):
      np.testing.assert_array_equal(batch[:, 0], a.batch_rows(step))
      np.testing.assert_array_equal(batch, reader.read_indices(a.batch_rows(step)))
  with _loader(reader, start_step=23) as b:
    for step in range(23, 30):
      np.testing.assert_array_equal(next(b), batches[step])


def test_heldout_batches_in_order(reader):
  batches = list(loader.heldout_batches(reader, 20, 5, heldout_tokens=HELDOUT, scale=2.0,
                                        sharding=None))
  np.testing.assert_array_equal(np.concatenate(batches)[:, 0], 2.0 * np.arange(1000, 1100))
  with pytest.raises(ValueError, match='need 120 rows; only heldout_tokens=100'):
    list(loader.heldout_batches(reader, 20, 6, heldout_tokens=HELDOUT, scale=1.0, sharding=None))


def test_global_array_sharded_over_a_2x4_mesh(reader):
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
  sharding = NamedSharding(mesh, P('data', None))
  with _loader(reader, sharding=sharding, dtype='bfloat16', scale=0.5) as a:
    batch = next(a)
    assert isinstance(batch, jax.Array) and batch.shape == (40, D)
    assert batch.sharding == sharding and batch.dtype == ml_dtypes.bfloat16
    assert {s.data.shape for s in batch.addressable_shards} == {(20, D)}
    expected = (0.5 * reader.read_indices(a.batch_rows(0))).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(batch), expected)
  held = next(loader.heldout_batches(reader, 40, 1, heldout_tokens=HELDOUT, scale=1.0,
                                     sharding=sharding))
  assert held.sharding == sharding
  np.testing.assert_array_equal(np.asarray(held)[:, 0], np.arange(1000, 1040))


def test_batch_not_divisible_by_the_data_axis(reader):
  mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ('data', 'model'))
  with pytest.raises(ValueError) as err:
    _loader(reader, batch_size=100, sharding=NamedSharding(mesh, P('data', None)))
  assert str(err.value) == ("global batch size 100 is not divisible by the data axis size 8 "
                            "(mesh {'data': 8, 'model': 1})")


def test_too_few_rows(reader):
  with pytest.raises(ValueError, match='leaves 50 training rows, fewer than one global batch of 64'):
    _loader(reader, batch_size=64, heldout_tokens=1050)


def test_prefetch_thread_errors_surface(reader):
  broken = store.StoreReader(reader.path)

  def fail(start, stop):
    raise OSError(f'disk gone reading rows {start}:{stop}')

  broken.read_rows_async = fail
  a = _loader(broken)
  with pytest.raises(RuntimeError, match='reading step 0 failed in the prefetch thread') as err:
    next(a)
  assert isinstance(err.value.__cause__, OSError) and 'disk gone' in str(err.value)
  with pytest.raises(RuntimeError):  # stays failed
    next(a)
  assert not a._thread.is_alive()


def test_close_stops_the_thread(reader):
  with _loader(reader, prefetch=1) as a:
    next(a)
  assert not a._thread.is_alive()
  with pytest.raises(RuntimeError, match='is closed'):
    next(a)


def test_normalization_scale(reader):
  x = reader.read_rows(0, N_ROWS).astype(np.float64)
  scale = loader.normalization_scale(reader)
  np.testing.assert_allclose(scale, np.sqrt(D / (x ** 2).sum(1).mean()), rtol=1e-6)
  np.testing.assert_allclose(((scale * x) ** 2).sum(1).mean(), D, rtol=1e-6)
  with _loader(reader, scale=scale) as a:
    np.testing.assert_allclose(next(a), scale * reader.read_indices(a.batch_rows(0)), rtol=1e-6)
