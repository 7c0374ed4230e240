"""An SAE's inference activations in blocks of latents, and per-latent running statistics.

`sae.encode` returns the dense [B, n_latents] code; at a million latents that is
16 GiB for a batch of 4096 tokens. Here the same activations are produced one
block of latents at a time, each block consumed as soon as it exists:

    relu_l1     a = ReLU(x @ W_enc + b_enc)
    jumprelu    a = pre * 1[pre > exp(log_threshold)]
    batchtopk   a = pre * 1[pre > max(threshold, 0)],  pre = (x - b_dec) @ W_enc + b_enc
    topk        a = ReLU of the per-token top-k of (x - b_dec) @ W_enc + b_enc, selected over
                every latent first (`sparse.encode_select`, blocked), then densified
                block by block

(the semantics of each architecture's `encode`; tests/test_features.py checks
them against it). The latent axis is sharded over the mesh axis `model`: each
device runs `shard_map`'s body over its own latents in blocks, and TopK merges
the devices' per-token selections with one all-gather of [B, k].

`make_update` builds the step that folds one batch into the running per-latent
state: firing count, activation sum, a histogram over fixed log2 bins, the top-N
activating rows, and a uniform sample of M firing rows by priority sampling (the
M rows of smallest hash(row, latent) among those where the latent fires: one
pass, no randomness, the same sample however the pass is cut into batches or
resumed). TopK folds its B * k selected entries directly (segment sums, a sort
by latent, one merge over the state), so, as in the trainer, the encoder's
selection is the only work over every latent; the threshold architectures fold
each block's dense activations.
"""
import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from dictlearn import sharding as sharding_lib
from dictlearn.sae import sparse
from dictlearn.sae.jumprelu import JumpReLUSAE

# Histogram bins over activations a > 0: bin 0 is (0, 2^LOW); bin j in
# [1, HIST_BINS - 1) is [2^(LOW + (j-1)/PER_OCTAVE), 2^(LOW + j/PER_OCTAVE)); the
# last bin is everything above. Half-octave bins from 2^-6 to 2^9 cover the
# activations of an SAE whose inputs are normalised to E||x||^2 = d_model.
HIST_BINS = 32
HIST_LOW_LOG2 = -6.0
HIST_PER_OCTAVE = 2
# Priority-sampling scores are 24-bit integers held exactly in float32.
_HASH_BITS = 24
ARCHITECTURES = ('relu_l1', 'jumprelu', 'batchtopk', 'topk')


def hist_edges():
  """The HIST_BINS + 1 bin edges (0 first, inf last), float64 numpy."""
  inner = 2.0 ** (HIST_LOW_LOG2 + np.arange(HIST_BINS - 1) / HIST_PER_OCTAVE)
  return np.concatenate([[0.0], inner, [np.inf]])


def hist_bin(acts):
  """Bin index of each activation (meaningful where acts > 0), int32."""
  scaled = (jnp.log2(jnp.maximum(acts, 1e-30)) - HIST_LOW_LOG2) * HIST_PER_OCTAVE
  inner = jnp.clip(jnp.floor(scaled).astype(jnp.int32) + 1, 1, HIST_BINS - 1)
  return jnp.where(acts >= 2.0 ** HIST_LOW_LOG2, inner, 0)


def priority_hash(rows, latents):
  """hash(row, latent) as uint32 (a murmur3-style finaliser): the sampling priority."""
  h = (rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)) ^ (
      latents.astype(jnp.uint32) * jnp.uint32(0x85EBCA77))
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x2C1B3C6D)
  h = h ^ (h >> 12)
  h = h * jnp.uint32(0x297A2D39)
  return h ^ (h >> 15)


def sample_score(rows, latents):
  """Priority score: larger for a smaller hash; exact in float32."""
  h = priority_hash(rows, latents) >> (32 - _HASH_BITS)
  return (jnp.uint32(1 << _HASH_BITS) - h).astype(jnp.float32)


# ---------------------------------------------------------------------------
# The encoder, as arrays
# ---------------------------------------------------------------------------


class Encoder(NamedTuple):
  """What the blocked encoder needs of an SAE (static fields only: a jit constant)."""
  architecture: str
  n_latents: int
  d_model: int
  top_k: int           # topk: latents kept per token; 0 for the threshold architectures
  centre: bool         # the encoder sees x - b_dec (topk, batchtopk)
  dtype: str           # matmul input dtype
  select_block: int    # topk: sae.encoder_block_size for the per-token selection (0 = one)


def make_encoder(sae):
  """The Encoder of a dictlearn SAE.

  Raises:
    ValueError: an architecture this module does not know.
  """
  if sae.name not in ARCHITECTURES:
    raise ValueError(f'SAE architecture {sae.name!r} has no blocked encoder; expected one of '
                     f'{ARCHITECTURES}')
  return Encoder(sae.name, sae.n_latents, sae.d_model, sae.cfg.k if sae.name == 'topk' else 0,
                 sae.name in ('topk', 'batchtopk'), jnp.dtype(sae.dtype).name, sae.block_size)


def encoder_arrays(encoder, params, buffers):
  """{'W_enc', 'b_enc', 'b_dec', 'theta'}: theta [n] is the inference threshold of the
  threshold architectures (a > 0 where pre > theta), zeros for topk."""
  n = encoder.n_latents
  if encoder.architecture == 'jumprelu':
    theta = JumpReLUSAE.threshold(params)
  elif encoder.architecture == 'batchtopk':
    theta = jnp.full((n,), jnp.maximum(buffers['threshold'].astype(jnp.float32), 0.0))
  else:
    theta = jnp.zeros((n,), jnp.float32)
  return {'W_enc': params['W_enc'], 'b_enc': params['b_enc'], 'b_dec': params['b_dec'],
          'theta': theta}


def array_specs():
  """PartitionSpecs of `encoder_arrays` over the ('data', 'model') mesh."""
  return {'W_enc': P(None, 'model'), 'b_enc': P('model'), 'b_dec': P(), 'theta': P('model')}


def encoder_input(encoder, arrays, x):
  x = x.astype(jnp.float32)
  return x - arrays['b_dec'].astype(jnp.float32) if encoder.centre else x


def _selection(encoder, arrays, x_in, offset, n_shards):
  """TopK: the per-token top-k over every latent, global ids; (relu values, latents)."""
  spec = sparse.EncoderSpec(k=encoder.top_k, block_size=encoder.select_block,
                            dtype=encoder.dtype)
  out = sparse.encode_select(x_in, arrays['W_enc'], arrays['b_enc'], spec)
  values, latents = out.values, out.latents + offset
  if n_shards > 1:  # shards in order: equal values keep the lower latent, as lax.top_k does
    values = lax.all_gather(values, 'model', axis=1, tiled=True)
    latents = lax.all_gather(latents, 'model', axis=1, tiled=True)
    values, pos = lax.top_k(values, encoder.top_k)
    latents = jnp.take_along_axis(latents, pos, axis=-1)
  return jax.nn.relu(values), latents


def _block_acts(encoder, arrays, x_in, selection, start, size, offset):
  """Activations [B, size] of local latents [start, start + size)."""
  if encoder.top_k:
    values, latents = selection
    local = latents - (offset + start)
    local = jnp.where((local >= 0) & (local < size), local, size)  # out of block: dropped
    rows = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros((values.shape[0], size), jnp.float32).at[rows, local].add(
        values, mode='drop')
  cut = lambda a, axis: lax.dynamic_slice_in_dim(a, start, size, axis=axis)
  pre = sparse.preactivations(x_in, cut(arrays['W_enc'], 1), cut(arrays['b_enc'], 0),
                              encoder.dtype)
  return jnp.where(pre > cut(arrays['theta'], 0), pre, 0.0)


def _local_context(encoder, block, n_local):
  n_shards = encoder.n_latents // n_local
  offset = lax.axis_index('model') * n_local if n_shards > 1 else 0
  return n_shards, offset, block or n_local


# ---------------------------------------------------------------------------
# Running statistics
# ---------------------------------------------------------------------------


def init_state(n_latents, top_n, n_samples):
  """The empty running state (numpy): see `update_statistics`."""
  return {
      'count': np.zeros((n_latents,), np.int32),
      'act_sum': np.zeros((n_latents,), np.float32),
      'hist': np.zeros((n_latents, HIST_BINS), np.int32),
      'top_values': np.full((n_latents, top_n), -1.0, np.float32),
      'top_rows': np.full((n_latents, top_n), -1, np.int32),
      'sample_scores': np.full((n_latents, n_samples), -1.0, np.float32),
      'sample_values': np.zeros((n_latents, n_samples), np.float32),
      'sample_rows': np.full((n_latents, n_samples), -1, np.int32),
  }


def state_specs():
  return {name: P('model') if name in ('count', 'act_sum') else P('model', None)
          for name in init_state(1, 1, 1)}


def _merge_top(run, new, n):
  """Merges (scores, *payload) lists along the last axis; `run` wins ties."""
  scores = jnp.concatenate([run[0], new[0]], axis=-1)
  _, pos = lax.top_k(scores, n)
  return tuple(jnp.take_along_axis(jnp.concatenate([a, b], axis=-1), pos, axis=-1)
               for a, b in zip(run, new))


def _update_block(state, acts, valid, first_row, start, size, offset):
  """Folds a block's activations [B, size] into the state rows [start, start + size)."""
  acts = jnp.where(valid[:, None], acts, 0.0)
  fired = acts > 0
  get = lambda name: lax.dynamic_slice_in_dim(state[name], start, size, axis=0)
  put = lambda name, value: lax.dynamic_update_slice_in_dim(state[name], value, start, axis=0)
  out = dict(state)
  out['count'] = put('count', get('count') + jnp.sum(fired, axis=0, dtype=jnp.int32))
  out['act_sum'] = put('act_sum', get('act_sum') + jnp.sum(acts, axis=0))
  index = (jnp.arange(size, dtype=jnp.int32)[None, :] * HIST_BINS + hist_bin(acts)).reshape(-1)
  hist = jax.ops.segment_sum(fired.reshape(-1).astype(jnp.int32), index,
                             num_segments=size * HIST_BINS).reshape(size, HIST_BINS)
  out['hist'] = put('hist', get('hist') + hist)

  batch = acts.shape[0]
  rows = first_row + jnp.arange(batch, dtype=jnp.int32)
  acts_t = acts.T  # [size, B]
  top_n = state['top_values'].shape[1]
  values, pos = sparse.top_k_rows(jnp.where(acts_t > 0, acts_t, -1.0), min(top_n, batch))
  new_rows = jnp.where(values > 0, rows[pos], -1)
  merged = _merge_top((get('top_values'), get('top_rows')), (values, new_rows), top_n)
  out['top_values'], out['top_rows'] = put('top_values', merged[0]), put('top_rows', merged[1])

  n_samples = state['sample_scores'].shape[1]
  latents = offset + start + jnp.arange(size, dtype=jnp.int32)
  scores = jnp.where(acts_t > 0, sample_score(rows[None, :], latents[:, None]), -1.0)
  scores, pos = sparse.top_k_rows(scores, min(n_samples, batch))
  new = (scores, jnp.take_along_axis(acts_t, pos, axis=-1), jnp.where(scores > 0, rows[pos], -1))
  merged = _merge_top((get('sample_scores'), get('sample_values'), get('sample_rows')), new,
                      n_samples)
  for name, value in zip(('sample_scores', 'sample_values', 'sample_rows'), merged):
    out[name] = put(name, value)
  return out


def _segment_top(keys, latents, payload, n_local, n):
  """Each latent's n entries of largest key, from flat entries: ([n_local, n] keys, payloads).

  Entries are sorted by (latent, -key), stably, so equal keys keep their order (lower
  rows first, as the dense path's top-k over rows does); an entry's rank is its
  distance from its latent's first entry. Latent n_local collects what to drop.
  """
  order = [latents, -keys] + list(payload)
  latents, neg_keys, *payload = lax.sort(order, num_keys=2, is_stable=True)
  rank = jnp.arange(latents.shape[0], dtype=jnp.int32) - jnp.searchsorted(
      latents, latents, side='left').astype(jnp.int32)
  slot = jnp.where((rank < n) & (latents < n_local), rank, n)  # n: out of bounds, dropped
  out = [jnp.full((n_local, n), -1.0, jnp.float32).at[latents, slot].set(-neg_keys, mode='drop')]
  for p, fill in zip(payload, (0, -1)):
    out.append(jnp.full((n_local, n), fill, p.dtype).at[latents, slot].set(p, mode='drop'))
  return out


def _update_sparse(state, selection, valid, first_row, offset, n_local):
  """Folds a batch's TopK codes into the state: O(B * k) work plus one merge over the
  state, never a [B, n_latents] array."""
  values, latents = selection
  batch, k = values.shape
  local = latents - offset
  mine = (local >= 0) & (local < n_local) & valid[:, None] & (values > 0)
  local = jnp.where(mine, local, n_local).reshape(-1)
  values = jnp.where(mine, values, 0.0).reshape(-1)
  rows = jnp.broadcast_to(first_row + jnp.arange(batch, dtype=jnp.int32)[:, None],
                          (batch, k)).reshape(-1)
  segments = lambda v, index, n: jax.ops.segment_sum(v, index, num_segments=n)
  fired = mine.reshape(-1).astype(jnp.int32)
  out = dict(state)
  out['count'] = state['count'] + segments(fired, local, n_local + 1)[:n_local]
  out['act_sum'] = state['act_sum'] + segments(values, local, n_local + 1)[:n_local]
  hist = segments(fired, local * HIST_BINS + hist_bin(values), (n_local + 1) * HIST_BINS)
  out['hist'] = state['hist'] + hist[:n_local * HIST_BINS].reshape(n_local, HIST_BINS)
  top_n = state['top_values'].shape[1]
  top = _segment_top(jnp.where(values > 0, values, -1.0), local, (rows,), n_local, top_n)
  merged = _merge_top((state['top_values'], state['top_rows']), tuple(top), top_n)
  out['top_values'], out['top_rows'] = merged
  n_samples = state['sample_scores'].shape[1]
  scores = jnp.where(values > 0, sample_score(rows, local + offset), -1.0)
  sample = _segment_top(scores, local, (values, rows), n_local, n_samples)
  merged = _merge_top((state['sample_scores'], state['sample_values'], state['sample_rows']),
                      tuple(sample), n_samples)
  out['sample_scores'], out['sample_values'], out['sample_rows'] = merged
  return out


@functools.lru_cache(maxsize=8)  # one compilation per (SAE shape, mesh, block) in a process
def make_update(encoder, mesh, block_size):
  """The jitted `update(state, arrays, x, valid, first_row) -> (state, codes)`.

  Args:
    encoder: the SAE's Encoder.
    mesh: a ('data', 'model') mesh; latents are split over 'model'.
    block_size: latents per block within a device (a divisor of n_latents / shards).

  Returns:
    update: state (`init_state`, sharded like `state_specs`, donated), arrays (`encoder_arrays`,
    sharded like `array_specs`), x [B, d] float32 (already scaled like the
    training data), valid [B] bool (padding rows False), first_row int32: the
    store row of x[0]. codes = (values, latents) [B, k] of the TopK selection
    (zeros [B, 1] for the other architectures).
  """
  n_local = encoder.n_latents // mesh.shape['model']

  def local(state, arrays, x, valid, first_row):
    n_shards, offset, block = _local_context(encoder, block_size, n_local)
    x_in = encoder_input(encoder, arrays, x)
    if encoder.top_k:  # the selection is the only pass over every latent
      selection = _selection(encoder, arrays, x_in, offset, n_shards)
      return _update_sparse(state, selection, valid, first_row, offset, n_local), selection
    zeros = jnp.zeros((x.shape[0], 1))
    selection = (zeros, zeros.astype(jnp.int32))

    def body(i, state):
      start = i * block
      acts = _block_acts(encoder, arrays, x_in, selection, start, block, offset)
      return _update_block(state, acts, valid, first_row, start, block, offset)

    state = lax.fori_loop(0, n_local // block, body, state)
    return state, selection

  mapped = jax.shard_map(local, mesh=mesh,
                         in_specs=(state_specs(), array_specs(), P(), P(), P()),
                         out_specs=(state_specs(), (P(), P())), check_vma=False)
  return jax.jit(mapped, donate_argnums=0)


def check_block_size(encoder, mesh, block_size):
  """The block size to use: `block_size` if it divides the latents of one device, else
  that whole count (0 asks for it). Raises ValueError when n_latents does not split."""
  shards = mesh.shape['model']
  if encoder.n_latents % shards:
    raise ValueError(f'n_latents={encoder.n_latents} does not split over the {shards} devices '
                     "of the mesh axis 'model'")
  n_local = encoder.n_latents // shards
  if encoder.top_k and encoder.select_block and n_local % encoder.select_block:
    raise ValueError(f'sae.encoder_block_size={encoder.select_block} does not divide the '
                     f'{n_local} latents of one device (mesh axis model={shards})')
  return block_size if block_size and n_local % block_size == 0 else n_local


def place(mesh, tree, specs):
  """Puts a tree of host or device arrays onto `mesh` with `specs`."""
  return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)


def latent_mesh(devices=None):
  """A ('data', 'model') mesh with every device on 'model' (latents split, batch whole)."""
  return sharding_lib.make_mesh((1, -1), ('data', 'model'), devices)


# ---------------------------------------------------------------------------
# Pointwise and per-token views (contexts, explanations)
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def pair_preactivations(encoder, arrays, x, latents):
  """pre[p] = x_in[p] . W_enc[:, latents[p]] + b_enc[latents[p]] for x [P, d], latents [P]."""
  x_in = encoder_input(encoder, arrays, x)
  dtype = jnp.dtype(encoder.dtype)
  w = jnp.take(arrays['W_enc'], latents, axis=1).T
  pre = jnp.einsum('pd,pd->p', x_in.astype(dtype), w.astype(dtype),
                   preferred_element_type=jnp.float32)
  return pre + jnp.take(arrays['b_enc'], latents).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def top_features(encoder, arrays, x, n_top, block_size):
  """Each row's n_top largest activations over every latent: (values, latents) [B, n_top].

  Unsharded (for prompts of a few hundred tokens); latents in blocks of block_size.
  """
  x_in = encoder_input(encoder, arrays, x)
  batch = x.shape[0]
  if encoder.top_k:
    values, latents = _selection(encoder, arrays, x_in, 0, 1)
    latents = jnp.where(values > 0, latents, -1)
    if n_top <= encoder.top_k:
      return values[:, :n_top], latents[:, :n_top]
    pad = ((0, 0), (0, n_top - encoder.top_k))
    return jnp.pad(values, pad), jnp.pad(latents, pad, constant_values=-1)
  block = block_size if block_size and encoder.n_latents % block_size == 0 else encoder.n_latents
  n_top_block = min(n_top, block)

  def body(i, run):
    acts = _block_acts(encoder, arrays, x_in, None, i * block, block, 0)
    values, latents = sparse.top_k_rows(acts, n_top_block)
    return _merge_top(run, (values, latents + i * block), n_top)

  init = (jnp.full((batch, n_top), -1.0), jnp.full((batch, n_top), -1, jnp.int32))
  values, latents = lax.fori_loop(0, encoder.n_latents // block, body, init)
  return jnp.maximum(values, 0.0), jnp.where(values > 0, latents, -1)
