"""The interface every SAE architecture implements, and what they share.

An SAE is a stateless object built from the `sae` section of the config: it owns
no arrays. Parameters and buffers are plain dicts of arrays created by `init`,
passed to every method, and carry logical axis names (`logical_axes`) from which
the trainer derives their shardings. Every method is pure and jittable.

Shapes: x [B, d_model]; W_enc [d_model, n_latents]; b_enc [n_latents];
W_dec [n_latents, d_model]; b_dec [d_model].
"""
import abc
import logging
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections

from dictlearn.sae import sparse

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Weiszfeld iterations for the geometric median of `init_b_dec`.
_GEOMETRIC_MEDIAN_STEPS = 100


class ForwardOutput(NamedTuple):
  """What a training forward pass returns.

  Attributes:
    loss: scalar, the quantity that is differentiated.
    metrics: dict of scalars: 'mse', 'fvu', 'l0' and the loss parts by name.
    fired: [n_latents] float32, tokens of this batch on which each latent fired.
    buffers: updated non-trainable state ({} for most architectures).
  """
  loss: jax.Array
  metrics: dict
  fired: jax.Array
  buffers: dict


def parse_dtype(name, field):
  """Returns the jnp dtype called `name`; ValueError naming `field` otherwise."""
  if name not in _DTYPES:
    raise ValueError(f'{field}={name!r} is not one of {sorted(_DTYPES)}')
  return _DTYPES[name]


def random_directions(key, n, d, norm, dtype=jnp.float32):
  """[n, d] rows drawn uniformly on the sphere of radius `norm`."""
  w = jax.random.normal(key, (n, d), jnp.float32)
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  return (norm * w).astype(dtype)


def unit_rows(w):
  """Rescales the rows of `w` to unit L2 norm (rows of norm 0 stay 0)."""
  w32 = w.astype(jnp.float32)
  norm = jnp.linalg.norm(w32, axis=-1, keepdims=True)
  return (w32 / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)).astype(w.dtype)


def remove_parallel_component(grad, w):
  """Removes from each row of `grad` its component along the same row of `w`.

  With unit-norm decoder rows, this keeps the Adam update tangent to the sphere
  (Bricken et al. 2023; OpenAI TopK; Gemma Scope).
  """
  g32, u = grad.astype(jnp.float32), unit_rows(w.astype(jnp.float32))
  g32 = g32 - jnp.sum(g32 * u, axis=-1, keepdims=True) * u
  return g32.astype(grad.dtype)


def geometric_median(points, steps=_GEOMETRIC_MEDIAN_STEPS):
  """Weiszfeld's algorithm from the mean, a fixed number of steps: [N, d] -> [d]."""
  points = points.astype(jnp.float32)
  eps = 1e-8

  def body(_, y):
    w = 1.0 / jnp.maximum(jnp.linalg.norm(points - y, axis=-1), eps)
    return jnp.sum(w[:, None] * points, axis=0) / jnp.sum(w)

  return lax.fori_loop(0, steps, body, jnp.mean(points, axis=0))


def reconstruction_metrics(x, x_hat):
  """Returns (mse: squared error summed over d, mean over batch; fvu)."""
  err = x - x_hat
  mse = jnp.sum(err * err) / x.shape[0]
  return mse, fvu_of(x, mse)


def fvu_of(x, mse):
  """The fraction of x's batch variance that an error of `mse` (as above) leaves."""
  centred = x - jnp.mean(x, axis=0, keepdims=True)
  total_variance = jnp.sum(centred * centred)
  return mse * x.shape[0] / jnp.maximum(total_variance, jnp.finfo(jnp.float32).tiny)


# ---------------------------------------------------------------------------
# Each loss written once: evaluated forward-only or with its gradient
# ---------------------------------------------------------------------------
#
# An architecture writes its loss once, as functions params -> (value, aux), and
# these evaluate them either way: `forward` (the value; an outer jax.grad may
# still differentiate it) and `loss_and_grads` (the trainer's path, where each
# branch taken at run time is differentiated on its own).


def as_value(loss):
  """A loss returning a ForwardOutput, as params -> (out.loss, out)."""
  def run(params):
    out = loss(params)
    return out.loss, out
  return run


def value_and_grads(fn, params, *, grads):
  """((value, aux), gradient of value wrt params, or None unless `grads`) for
  fn(params) -> (value, aux)."""
  if grads:
    return jax.value_and_grad(fn, has_aux=True)(params)
  return fn(params), None


def cond_value_and_grads(pred, true_fn, false_fn, params, *, grads, remat_true=False):
  """`value_and_grads` of lax.cond(pred, true_fn, false_fn, params).

  With grads, each branch is differentiated inside its own side of the cond, so
  that no branch's residuals cross it and nothing is recomputed. Without,
  `remat_true` rematerialises true_fn, so that under an outer jax.grad it
  saves only its operands (a dense fallback would otherwise save its [B, n]
  residuals, as zeros when the other branch runs).
  """
  if grads:
    differentiated = lambda f: lambda p: jax.value_and_grad(f, has_aux=True)(p)
    return lax.cond(pred, differentiated(true_fn), differentiated(false_fn), params)
  return lax.cond(pred, jax.checkpoint(true_fn) if remat_true else true_fn, false_fn,
                  params), None


class SparseAutoencoder(abc.ABC):
  """Base class of the SAE architectures.

  Subclasses set `name`, `unit_norm_decoder`, and implement `init`, `loss` and
  `encode`. Reads the `sae` config section directly; nothing has defaults.
  `tuning` sizes the sparse kernels' tiles and loops (results do not depend on it).
  """
  name: str = ''
  # Decoder rows kept at unit norm by process_grads / process_params.
  unit_norm_decoder: bool = False

  def __init__(self, cfg: ml_collections.ConfigDict, d_model: int,
               tuning: sparse.KernelTuning = sparse.DEFAULT_TUNING):
    if d_model < 1:
      raise ValueError(f'd_model must be positive, got {d_model}')
    if cfg.n_latents < 1:
      raise ValueError(f'sae.n_latents must be positive, got {cfg.n_latents}')
    self.cfg = cfg
    self.tuning = tuning
    self.d_model = int(d_model)
    self.n_latents = int(cfg.n_latents)
    self.dtype = parse_dtype(cfg.dtype, 'sae.dtype')
    self.param_dtype = parse_dtype(cfg.param_dtype, 'sae.param_dtype')
    self.block_size = int(cfg.encoder_block_size)
    if self.block_size < 0:
      raise ValueError(f'sae.encoder_block_size must be >= 0, got {self.block_size}')
    logging.info('SAE %s: d_model=%d n_latents=%d dtype=%s block_size=%d',
                 self.name, self.d_model, self.n_latents, cfg.dtype, self.block_size)

  # ---- parameters ----------------------------------------------------------

  def _tied_init(self, key, decoder_norm):
    """W_dec rows: random directions of norm `decoder_norm`; W_enc = W_dec^T; biases 0."""
    w_dec = random_directions(key, self.n_latents, self.d_model, decoder_norm)
    return {
        'W_enc': w_dec.T.astype(self.param_dtype),
        'b_enc': jnp.zeros((self.n_latents,), self.param_dtype),
        'W_dec': w_dec.astype(self.param_dtype),
        'b_dec': jnp.zeros((self.d_model,), self.param_dtype),
    }

  @abc.abstractmethod
  def init(self, key) -> tuple[dict, dict]:
    """Returns (params, buffers) for PRNG `key`."""

  def logical_axes(self) -> tuple[dict, dict]:
    """Logical axis names with the structure of (params, buffers)."""
    params = {
        'W_enc': ('embed', 'latent'),
        'b_enc': ('latent',),
        'W_dec': ('latent', 'embed'),
        'b_dec': ('embed',),
    }
    return params, {}

  def init_b_dec(self, params, sample):
    """Sets b_dec to the geometric median of `sample` [N, d_model]."""
    if sample.ndim != 2 or sample.shape[1] != self.d_model:
      raise ValueError(f'init_b_dec expects a [N, {self.d_model}] sample, got '
                       f'{sample.shape}')
    return dict(params, b_dec=geometric_median(sample).astype(params['b_dec'].dtype))

  # ---- forward -------------------------------------------------------------

  @abc.abstractmethod
  def loss(self, params, buffers, x, *, sparsity_coefficient, dead_mask,
           grads: bool) -> tuple[ForwardOutput, dict | None]:
    """The training loss on x [B, d_model], written once for both uses.

    Args:
      params, buffers: the SAE's state.
      x: [B, d_model] batch.
      sparsity_coefficient: the scheduled penalty coefficient (ReLU family).
      dead_mask: [n_latents] bool, latents counted dead (AuxK), or None.
      grads: also return the gradient wrt params (the architecture may fuse
        its backward, and differentiates each branch taken at run time on its
        own: see `cond_value_and_grads`).

    Returns:
      (ForwardOutput, gradient dict or None without grads).
    """

  def forward(self, params, buffers, x, *, sparsity_coefficient, dead_mask) -> ForwardOutput:
    """Training forward pass on x [B, d_model]; see ForwardOutput (differentiable)."""
    return self.loss(params, buffers, x, sparsity_coefficient=sparsity_coefficient,
                     dead_mask=dead_mask, grads=False)[0]

  def loss_and_grads(self, params, buffers, x, *, sparsity_coefficient,
                     dead_mask) -> tuple[ForwardOutput, dict]:
    """The training loss and its gradient wrt params: (out, grads). The trainer calls this."""
    return self.loss(params, buffers, x, sparsity_coefficient=sparsity_coefficient,
                     dead_mask=dead_mask, grads=True)

  @abc.abstractmethod
  def encode(self, params, buffers, x) -> jax.Array:
    """Inference activations, dense [B, n_latents] float32."""

  def decode(self, params, acts):
    """Dense activations [B, n_latents] -> reconstruction [B, d_model] float32."""
    y = jnp.dot(acts.astype(self.dtype), params['W_dec'].astype(self.dtype),
                preferred_element_type=jnp.float32)
    return y + params['b_dec'].astype(jnp.float32)

  def reconstruct(self, params, buffers, x):
    """Inference reconstruction [B, d_model]; subclasses decode sparsely."""
    return self.decode(params, self.encode(params, buffers, x))

  def _preacts(self, params, x):
    """Dense pre-activations x @ W_enc + b_enc in float32 (matmul in self.dtype)."""
    return sparse.preactivations(x, params['W_enc'], params['b_enc'], self.dtype)

  # ---- updates around the optimizer -----------------------------------------

  def process_grads(self, params, grads):
    """Removes the gradient along unit-norm decoder rows (if the recipe keeps them)."""
    if not self.unit_norm_decoder:
      return grads
    return dict(grads, W_dec=remove_parallel_component(grads['W_dec'], params['W_dec']))

  def process_params(self, params):
    """Renormalises decoder rows after the update (if the recipe keeps them unit)."""
    if not self.unit_norm_decoder:
      return params
    return dict(params, W_dec=unit_rows(params['W_dec']))

  # ---- shared pieces -------------------------------------------------------

  def _spec(self, **fields):
    return sparse.EncoderSpec(block_size=self.block_size, dtype=jnp.dtype(self.dtype).name,
                              tuning=self.tuning, **fields)

  def _select_positive(self, x_in, W_enc, b_enc, threshold=None, margin=0.0):
    """The capacity selection of `sparse_capacity` slots per token (no gradient)."""
    stop = lax.stop_gradient
    return sparse.select_positive(
        stop(x_in), stop(W_enc), stop(b_enc), self.cfg.sparse_capacity,
        threshold=None if threshold is None else stop(threshold), margin=margin,
        block_size=self.block_size, dtype=jnp.dtype(self.dtype).name, tuning=self.tuning)

  def _sparse_decode(self, params, acts, latents, tokens=None):
    """sum of acts * W_dec rows at the entries, plus b_dec: [B, d_model] float32."""
    y = sparse.sparse_decode(acts, latents, params['W_dec'], tokens, self.tuning)
    return y + params['b_dec'].astype(jnp.float32)

  def _threshold_reconstruct(self, params, x_in, threshold, act_fn):
    """Inference reconstruction of a threshold activation, sparse when it fits.

    Args:
      params: SAE parameters.
      x_in: [B, d] encoder input.
      threshold: [n] float32; latent l is active where pre > threshold[l].
      act_fn: dense activation, pre [B, n] -> acts [B, n], for the fallback.

    Returns:
      [B, d] float32. With sparse_capacity > 0, follows the active latents
      sparsely (`sparse.select_positive`) and falls back to the dense decode
      for batches that overflow it (so the result is always exact).
    """
    dense = lambda: self.decode(params, act_fn(self._preacts(params, x_in)))
    if not self.cfg.sparse_capacity:
      return dense()
    sel = self._select_positive(x_in, params['W_enc'], params['b_enc'], threshold)

    def sparse_path():
      acts = jnp.where(sel.values > threshold[sel.latents], sel.values, 0.0)
      return self._sparse_decode(params, acts, sel.latents, sel.tokens)

    return lax.cond(sel.overflow, dense, sparse_path)


class CapacitySAE(SparseAutoencoder):
  """An SAE whose activation has a variable number of non-zeros (the ReLU family).

  With `sparse_capacity` > 0, training follows the entries that matter through
  a capacity selection (`sparse.select_positive`) and the sparse kernels, and
  computes a batch that overflows the capacity by the dense formulation, so
  results are always exact. Subclasses implement `_dense_loss`, `_sparse_loss`
  and `_selection_threshold`.
  """

  @abc.abstractmethod
  def _dense_loss(self, params, x, coefficient, dead_mask) -> ForwardOutput:
    """The training loss by the dense formulation (dead_mask: [n] bool or None)."""

  @abc.abstractmethod
  def _sparse_loss(self, params, x, selection, coefficient, dead_mask) -> ForwardOutput:
    """The training loss from a selection that holds every entry that matters."""

  @abc.abstractmethod
  def _selection_threshold(self, params):
    """(threshold [n] or None, margin): the entries with (pre - threshold) + margin > 0
    are the ones the sparse path must follow."""

  def loss(self, params, buffers, x, *, sparsity_coefficient, dead_mask, grads):
    """`_sparse_loss` when the capacity selection holds the batch, else `_dense_loss`.

    An 'overflow' metric (1 when the batch ran the dense formulation) is added
    when sparse_capacity > 0.
    """
    del buffers
    x = x.astype(jnp.float32)
    dense = as_value(lambda p: self._dense_loss(p, x, sparsity_coefficient, dead_mask))
    if not self.cfg.sparse_capacity:
      (_, out), g = value_and_grads(dense, params, grads=grads)
      return out, g
    threshold, margin = self._selection_threshold(params)
    selection = self._select_positive(x, params['W_enc'], params['b_enc'], threshold, margin)
    sparse_loss = as_value(lambda p: self._sparse_loss(p, x, selection, sparsity_coefficient,
                                                       dead_mask))
    use_dense = selection.overflow
    required = self._dense_required(dead_mask)
    if required is not None:
      use_dense = use_dense | required
    (_, out), g = cond_value_and_grads(use_dense, dense, sparse_loss, params,
                                       grads=grads, remat_true=True)
    return out._replace(metrics=dict(out.metrics,
                                     overflow=selection.overflow.astype(jnp.float32))), g

  def _dense_required(self, dead_mask):
    """A bool scalar: the batch must run `_dense_loss` whatever the selection
    holds (None: never), e.g. when the sparse path cannot serve an auxiliary term."""
    del dead_mask
    return None

  def _check_capacity(self):
    """Validates sparse_capacity for the ReLU-family architectures (0 <= C <= n)."""
    capacity = self.cfg.sparse_capacity
    if not 0 <= capacity <= self.n_latents:
      raise ValueError(f'sae.sparse_capacity={capacity} must be in [0, n_latents] '
                       f'(n_latents={self.n_latents})')
    if self.block_size:
      sparse.check_block_size(self.n_latents, self.block_size, 1)
