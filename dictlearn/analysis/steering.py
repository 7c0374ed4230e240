"""Interventions at hook sites: steer with SAE features and vectors, cap and ablate directions.

Each intervention is a `dictlearn.lm.llama.Patch` bound to one site: a frozen
dataclass registered as a JAX pytree whose arrays (strengths, vectors, bounds,
feature indices, position windows) are traced arguments of the compiled program
and whose site and kind of span are static. Pass a list of them to
`lm.forward(..., interventions=[...])` or `generate(..., interventions=[...])`:
several at several sites compose (in list order at one site), and a sweep over
strengths, vectors or features of the same shapes compiles once.

    add(site, vector, coefficient)          x + c v; v (d,) or (n, d): row j at position start + j
                                            (ActAdd's front injection, `prompt_difference`), or
                                            one vector per batch row; c scalar or per batch row
    add_feature(sae, i, coefficient)        x + c W_dec[i] / data_scale
    clamp(sae, features, values)            x + sum_j (v_j - f_ij(x)) W_dec[i_j] / data_scale:
                                            the SAE's reading of x with f_i set to v, its
                                            error term kept (Templeton et al. 2024)
    cap(site, direction, lo, hi)            the projection on a unit direction clipped to
                                            [lo, hi] (the Assistant-Axis activation capping)
    ablate(site, direction, strength)       x - s (x . u) u

Where: every intervention takes a `Span` (`span(...)`): 'all', 'prompt' or
'generated' positions, intersected with a window [start, stop) of absolute
positions (rotary positions: real tokens counted from 0, as `TokenInfo` gives
them) and without the positions holding `skip_token`; padding is never touched.
Outside the span the activation is returned bit for bit, and an intervention of
zero strength (add, add_feature, ablate) or a band that holds every projection
(cap) leaves the model bitwise unchanged.

SAE features live in the SAE's own units: the SAE was trained on activations
times the run's `data_scale`, so f(x) = encode(x * data_scale) and a decoder row
W_dec[i] is W_dec[i] / data_scale in the model's units. `load_sae(workdir)`
reads a training run's checkpoint with its site and scale.
"""
import dataclasses
import functools
import logging
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.analysis import encoding
from dictlearn.analysis import features
from dictlearn.lm import llama
from dictlearn.sae.base import SparseAutoencoder

SPANS = ('all', 'prompt', 'generated')
NO_TOKEN = -1  # skip_token value that skips nothing
_END = np.iinfo(np.int32).max  # stop of an open window

_static = functools.partial(dataclasses.field, metadata={'static': True})
_pytree = jax.tree_util.register_dataclass


def _f32(value) -> jax.Array:
  return jnp.asarray(value, jnp.float32)


def _i32(value) -> jax.Array:
  return jnp.asarray(value, jnp.int32)


def _concrete(value) -> Optional[np.ndarray]:
  """The value as numpy, or None inside a trace (then value checks are skipped)."""
  try:
    return np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    return None


def _check_width(site: str, vector: jax.Array, cfg: llama.LlamaConfig, what: str) -> None:
  if vector.ndim not in (1, 2) or vector.shape[-1] != cfg.d_model:
    raise ValueError(f'The {what} at {site!r} has shape {vector.shape}; this model ({cfg.name!r}) '
                     f'needs (d_model,) or (n_positions, d_model) with d_model = {cfg.d_model}.')


# ---- which positions ---------------------------------------------------------------


@_pytree
@dataclasses.dataclass(frozen=True)
class Span:
  """Positions an intervention changes: `kind`, in [start, stop), not holding skip_token."""
  kind: str = _static()
  start: jax.Array
  stop: jax.Array
  skip_token: jax.Array

  def mask(self, tokens: llama.TokenInfo) -> jax.Array:
    """bool (batch, seq): where the intervention applies."""
    inside = tokens.valid & (tokens.positions >= self.start) & (tokens.positions < self.stop)
    inside &= tokens.tokens != self.skip_token
    if self.kind == 'prompt':
      inside &= ~tokens.generated
    elif self.kind == 'generated':
      inside &= tokens.generated
    return inside


def span(kind: str = 'all', *, start: int = 0, stop: Optional[int] = None,
         skip_token: Optional[int] = None) -> Span:
  """Positions of kind 'all', 'prompt' or 'generated' in [start, stop), skipping `skip_token`.

  Raises:
    ValueError: an unknown kind, or stop <= start.
  """
  if kind not in SPANS:
    raise ValueError(f'span kind {kind!r} is not one of {SPANS}.')
  stop = _END if stop is None else stop
  if _concrete(stop) is not None and _concrete(start) is not None and stop <= start:
    raise ValueError(f'span window [start={start}, stop={stop}) is empty; expected stop > start.')
  return Span(kind, _i32(start), _i32(stop), _i32(NO_TOKEN if skip_token is None else skip_token))


def front(n_positions: int, start: int = 0) -> Span:
  """The n positions from `start` (ActAdd's injection at the front of the prompt)."""
  return span('all', start=start, stop=start + n_positions)


def switched_off(interventions: Sequence[llama.Patch]) -> list:
  """The same interventions acting on no position: the unpatched model, bit for bit, from
  the same compiled program (a baseline beside a sweep costs no compilation)."""
  out = []
  for patch in interventions:
    where = getattr(patch, 'where', None)
    if not isinstance(where, Span):
      raise ValueError(f'{type(patch).__name__} at {patch.site!r} has no Span to switch off.')
    out.append(dataclasses.replace(patch, where=dataclasses.replace(
        where, start=_i32(_END), stop=_i32(_END))))
  return out


def _apply(x: jax.Array, delta: jax.Array, where: Span, tokens: llama.TokenInfo) -> jax.Array:
  """x + delta inside the span, x (bit for bit) outside, in float32."""
  x = x.astype(jnp.float32)
  return jnp.where(where.mask(tokens)[..., None], x + delta, x)


# ---- the SAE at its site -------------------------------------------------------------


@_pytree
@dataclasses.dataclass(frozen=True)
class SaeAtSite:
  """A trained SAE bound to the hook site and scale it was trained at.

  Attributes:
    sae: the architecture (static).
    site: the hook site (static).
    model_name: the LM's config name the SAE was trained on ('' unknown; static).
    skip_token: a token whose activations the SAE never saw (BOS excluded from
      the harvest; -1 none; static): `clamp` leaves those positions alone.
    params, buffers: the trained arrays.
    data_scale: the run's normalisation factor (activations were multiplied by it).
  """
  sae: SparseAutoencoder = _static()
  site: str = _static()
  model_name: str = _static()
  skip_token: int = _static()
  params: dict
  buffers: dict
  data_scale: jax.Array

  @property
  def n_latents(self) -> int:
    return self.sae.n_latents

  def encode(self, x: jax.Array) -> jax.Array:
    """Feature activations (..., n_latents) float32 of model activations x (..., d_model)."""
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * self.data_scale
    return self.sae.encode(self.params, self.buffers, flat).reshape(*x.shape[:-1], -1)

  def decoder_rows(self, features: jax.Array) -> jax.Array:
    """W_dec[features] / data_scale: a unit of each feature, in the model's units."""
    return jnp.take(self.params['W_dec'], features, axis=0).astype(jnp.float32) / self.data_scale

  def check(self, cfg: llama.LlamaConfig) -> None:
    """Raises ValueError when this SAE was not trained on `cfg`'s model."""
    if self.sae.d_model != cfg.d_model:
      raise ValueError(f'The SAE at {self.site!r} reads d_model = {self.sae.d_model}; this model '
                       f'({cfg.name!r}) has d_model = {cfg.d_model}.')
    if self.model_name and cfg.name and self.model_name != cfg.name:
      raise ValueError(f'The SAE at {self.site!r} was trained on {self.model_name!r}; this model '
                       f'is {cfg.name!r}.')

  def check_features(self, features) -> None:
    """Raises ValueError for a feature index outside [0, n_latents) (skipped when traced)."""
    values = _concrete(features)
    if values is None:
      return
    bad = values[(values < 0) | (values >= self.n_latents)]
    if bad.size:
      raise ValueError(f'feature index {bad.tolist()} out of range: the SAE at {self.site!r} has '
                       f'{self.n_latents} latents (valid 0..{self.n_latents - 1}).')


class SaeRun(NamedTuple):
  """A training run's SAE at its site, and where it came from."""
  sae: SaeAtSite
  step: int
  store: str  # the activation store it was trained on
  model: Optional[str]  # the language model the store was harvested from (None: synthetic)


def load_sae_run(workdir: str, step: Optional[int] = None, *,
                 store: Optional[str] = None) -> SaeRun:
  """A training run's SAE at its site, with its data_scale (latest checkpoint by default).

  Args:
    workdir: the training run (or a pipeline's directory: its run is sae/).
    step: checkpoint step (None: the latest).
    store: the run's store where it is now, if it moved (see `features.open_run`).

  Raises:
    FileNotFoundError: no checkpoint, or no store where the run says.
  """
  run = features.open_run(workdir, store=store, step=step)
  params, buffers = features.restore_params(run, encoding.latent_mesh(jax.devices()[:1]))
  extra = run.manifest.get('extra') or {}
  skip = extra['bos_id'] if extra.get('exclude_bos') else NO_TOKEN
  sae = SaeAtSite(run.sae, run.manifest['site'], (extra.get('model') or {}).get('name', ''),
                  int(skip), params, buffers, _f32(run.data_scale))
  logging.info('SAE of %s step %d at %s (%d latents, data_scale %.4g)', run.workdir, run.step,
               sae.site, sae.n_latents, run.data_scale)
  return SaeRun(sae, run.step, run.reader.path, features.language_model_path(run.manifest))


def load_sae(workdir: str, step: Optional[int] = None) -> SaeAtSite:
  """`load_sae_run(...).sae`: the SAE of a training run at its site, with its data_scale."""
  return load_sae_run(workdir, step).sae


# ---- interventions -----------------------------------------------------------------


@_pytree
@dataclasses.dataclass(frozen=True)
class AddVector(llama.Patch):
  """x + coefficient * vector.

  A (d,) vector goes to every position of the span; a (n, d) vector puts row j
  at position where.start + j; with `per_row`, a (batch, d) vector gives each
  batch row its own. A (batch,) coefficient gives each batch row its own.
  """
  site: str = _static()
  per_row: bool = _static()
  vector: jax.Array
  coefficient: jax.Array
  where: Span

  def __call__(self, x, tokens):
    v, c = self.vector, self.coefficient
    for name, rows in (('per-row vector', v.shape[0] if self.per_row else None),
                       ('per-row coefficient', c.shape[0] if c.ndim else None)):
      if rows is not None and rows != x.shape[0]:
        raise ValueError(f'The {name} at {self.site!r} has {rows} rows; the batch has '
                         f'{x.shape[0]}.')
    if self.per_row:
      v = v[:, None, :]
    elif v.ndim == 2:
      offset = jnp.clip(tokens.positions - self.where.start, 0, v.shape[0] - 1)
      v = v[offset]  # (batch, seq, d); positions past the rows lie outside the span
    c = c[:, None, None] if c.ndim == 1 else c
    return _apply(x, c * v, self.where, tokens)

  def check(self, cfg):
    _check_width(self.site, self.vector, cfg, 'steering vector')


def add(site: str, vector, coefficient=1.0, where: Optional[Span] = None, *,
        per_row: bool = False) -> AddVector:
  """Adds coefficient * vector at `site` (see AddVector for the shapes).

  A (n, d) vector (ActAdd) defaults to the front window [0, n).

  Raises:
    ValueError: a per-row vector that is not (batch, d), or a coefficient that is
      neither a scalar nor one per row.
  """
  vector, coefficient = _f32(vector), _f32(coefficient)
  if per_row and vector.ndim != 2:
    raise ValueError(f'a per-row vector at {site!r} must be (batch, d_model), got shape '
                     f'{vector.shape}.')
  if coefficient.ndim > 1:
    raise ValueError(f'the coefficient at {site!r} must be a scalar or one per batch row, got '
                     f'shape {coefficient.shape}.')
  if where is None:
    where = front(vector.shape[0]) if vector.ndim == 2 and not per_row else span()
  return AddVector(site, per_row, vector, coefficient, where)

def add_feature(sae: SaeAtSite, feature: int, coefficient, where: Optional[Span] = None
                ) -> AddVector:
  """Adds coefficient units of an SAE feature's decoder direction at the SAE's site.

  Raises:
    ValueError: the feature index is out of range.
  """
  sae.check_features(feature)
  return add(sae.site, sae.decoder_rows(_i32(feature)), coefficient, where)


@_pytree
@dataclasses.dataclass(frozen=True)
class ClampFeatures(llama.Patch):
  """Sets SAE features to values in the SAE's decomposition of x, keeping its error term."""
  sae: SaeAtSite
  features: jax.Array  # int32 (m,)
  values: jax.Array  # float32 (m,), in the SAE's units
  where: Span

  @property
  def site(self):
    return self.sae.site

  def __call__(self, x, tokens):
    current = jnp.take(self.sae.encode(x), self.features, axis=-1)  # (batch, seq, m)
    delta = jnp.einsum('btm,md->btd', self.values - current, self.sae.decoder_rows(self.features))
    return _apply(x, delta, self.where, tokens)

  def check(self, cfg):
    self.sae.check(cfg)


def clamp(sae: SaeAtSite, features, values, where: Optional[Span] = None) -> ClampFeatures:
  """Clamps SAE features (int or (m,)) to values (same shape, SAE units) at the SAE's site.

  With x's SAE decomposition x * s = decode(f(x)) + e, the patched activation is
  (decode(f') + e) / s where f' is f with f_i set to the value; the other
  features and the error e are kept. Default span: every position except the
  token the SAE never saw (`sae.skip_token`).

  Raises:
    ValueError: a feature index out of range, or features and values of different shapes.
  """
  features, values = jnp.atleast_1d(_i32(features)), jnp.atleast_1d(_f32(values))
  if features.ndim != 1 or features.shape != values.shape:
    raise ValueError(f'clamp needs features and values of one shape (m,); got {features.shape} '
                     f'and {values.shape}.')
  sae.check_features(features)
  return ClampFeatures(sae, features, values, where or span(skip_token=sae.skip_token))


def _unit(site: str, direction) -> jax.Array:
  direction = _f32(direction)
  norm = _concrete(jnp.linalg.norm(direction))
  if norm is not None and not norm > 0:
    raise ValueError(f'The direction at {site!r} has norm {norm}; expected a non-zero vector.')
  return direction / jnp.linalg.norm(direction)


@_pytree
@dataclasses.dataclass(frozen=True)
class CapProjection(llama.Patch):
  """Keeps the projection of x on a unit direction inside [lo, hi]."""
  site: str = _static()
  direction: jax.Array  # unit (d,)
  lo: jax.Array
  hi: jax.Array
  where: Span

  def __call__(self, x, tokens):
    projection = x.astype(jnp.float32) @ self.direction
    shift = jnp.clip(projection, self.lo, self.hi) - projection
    return _apply(x, shift[..., None] * self.direction, self.where, tokens)

  def check(self, cfg):
    _check_width(self.site, self.direction, cfg, 'capping direction')


def cap(site: str, direction, lo=-np.inf, hi=np.inf, where: Optional[Span] = None
        ) -> CapProjection:
  """Caps the projection of the activation at `site` on `direction` (normalised) to [lo, hi].

  Raises:
    ValueError: lo > hi, or a zero direction.
  """
  lo_value, hi_value = _concrete(lo), _concrete(hi)
  if lo_value is not None and hi_value is not None and np.any(lo_value > hi_value):
    raise ValueError(f'cap band [lo={lo}, hi={hi}] is empty; expected lo <= hi.')
  return CapProjection(site, _unit(site, direction), _f32(lo), _f32(hi), where or span())


@_pytree
@dataclasses.dataclass(frozen=True)
class AblateDirection(llama.Patch):
  """x - strength * (x . u) u for a unit direction u (strength 1 removes it)."""
  site: str = _static()
  direction: jax.Array
  strength: jax.Array
  where: Span

  def __call__(self, x, tokens):
    projection = x.astype(jnp.float32) @ self.direction
    return _apply(x, -self.strength * projection[..., None] * self.direction, self.where, tokens)

  def check(self, cfg):
    _check_width(self.site, self.direction, cfg, 'ablation direction')


def ablate(site: str, direction, strength=1.0, where: Optional[Span] = None) -> AblateDirection:
  """Removes (strength 1) or scales down the component of the activation along `direction`."""
  return AblateDirection(site, _unit(site, direction), _f32(strength), where or span())


# ---- ActAdd ------------------------------------------------------------------------


def prompt_difference(params: llama.Params, cfg: llama.LlamaConfig, plus: Sequence[int],
                      minus: Sequence[int], site: str, pad_id: int) -> jax.Array:
  """ActAdd's steering vector: act(plus) - act(minus) at `site`, (n, d_model) float32.

  The shorter prompt is padded at its end with `pad_id` (a real token: Turner et
  al. pad with spaces) to the length n of the longer one. Add it with
  `add(site, vector, c)`: row j goes to position j of the steered prompt.

  Raises:
    ValueError: an empty prompt.
  """
  if not len(plus) or not len(minus):
    raise ValueError(f'prompt_difference needs two non-empty prompts, got lengths {len(plus)} '
                     f'and {len(minus)}.')
  n = max(len(plus), len(minus))
  tokens = np.full((2, n), pad_id, np.int32)
  tokens[0, :len(plus)], tokens[1, :len(minus)] = plus, minus
  _, acts = llama.forward(params, cfg, tokens, read_sites=[site], return_logits=False)
  return (acts[site][0] - acts[site][1]).astype(jnp.float32)
