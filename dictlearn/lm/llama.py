"""Llama-architecture language model in JAX, with hook sites to read and patch.

The layer weights are stacked along a leading layer axis and the layers run
under `jax.lax.scan`, so one layer is compiled, not thirty. Hook sites follow
TransformerLens names:

    hook_embed                      token embeddings (the input of block 0)
    blocks.{L}.hook_resid_pre       residual stream entering block L
    blocks.{L}.hook_attn_out        attention output of block L (before the residual add)
    blocks.{L}.hook_resid_mid       residual stream between attention and MLP
    blocks.{L}.hook_mlp_out         MLP output of block L (before the residual add)
    blocks.{L}.hook_resid_post      residual stream leaving block L
    ln_final.hook_normalized        final RMSNorm output (the input of the unembedding)

A site can be read (`read_sites`) or patched. A patch is a `Patch`: an object
bound to one site, called as `patch(x, tokens) -> x'` on the activation before
anything downstream sees it, with `tokens` (a `TokenInfo`) saying for every
position its token id, its position, whether it was generated and whether it is
real or padding. Patches are frozen dataclasses registered as JAX pytrees: their
arrays (strengths, vectors, bounds) are traced arguments of the compiled program,
the rest (the site, which positions) is static, so a sweep over strengths
compiles once (`dictlearn.analysis.steering` holds the interventions). A plain
function `fn(x) -> x'` (`patches={site: fn}`) is a `FunctionPatch`, static by
identity. Layers that carry a hook run on their own, between scans over the
plain layers around them (`scan [0, L)`, `layer L`, `scan (L, n)`), so a hook
costs nothing at run time and only one extra layer body at compile time.

Parameters (`params`), as built by `dictlearn.lm.load_model` (GGUF or Hugging Face):

    embed       (vocab, d_model)
    final_norm  (d_model,)
    unembed     (d_model, vocab)          only when the embeddings are not tied
    layers:
      attn_norm (n_layers, d_model)
      wq        (n_layers, d_model, n_heads, head_dim)
      wk, wv    (n_layers, d_model, n_kv_heads, head_dim)
      wo        (n_layers, n_heads, head_dim, d_model)
      mlp_norm  (n_layers, d_model)
      w_gate    (n_layers, d_model, d_mlp)
      w_up      (n_layers, d_model, d_mlp)
      w_down    (n_layers, d_mlp, d_model)
      bq        (n_layers, n_heads, head_dim)      optional attention biases (Qwen2),
      bk, bv    (n_layers, n_kv_heads, head_dim)   all three or none

The query/key head_dim axis is in the Hugging Face rotary layout (first half of
each head rotates with the second half), not llama.cpp's interleaved one.
"""
import dataclasses
import difflib
import functools
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = Mapping[str, Any]
PatchFn = Callable[[jax.Array], jax.Array]

BLOCK_SITES = ('hook_resid_pre', 'hook_attn_out', 'hook_resid_mid',
               'hook_mlp_out', 'hook_resid_post')
EMBED_SITE = 'hook_embed'
FINAL_SITE = 'ln_final.hook_normalized'
_BLOCK_SITE_RE = re.compile(r'^blocks\.(\d+)\.(hook_\w+)$')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a Llama-architecture model.

  Attributes:
    n_layers: number of transformer blocks.
    d_model: residual stream width.
    n_heads: query heads.
    n_kv_heads: key/value heads (grouped-query attention when < n_heads).
    head_dim: width of one attention head.
    d_mlp: hidden width of the gated MLP.
    vocab_size: number of tokens.
    rope_base: rotary embedding base frequency.
    rms_eps: epsilon of every RMSNorm.
    context_length: longest context the model was trained for.
    tie_embeddings: whether the unembedding is the transposed embedding.
    name: model name, for logs and manifests.
  """
  n_layers: int
  d_model: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_mlp: int
  vocab_size: int
  rope_base: float = 10000.0
  rms_eps: float = 1e-5
  context_length: int = 2048
  tie_embeddings: bool = True
  name: str = ''

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f'n_heads ({self.n_heads}) must be a multiple of n_kv_heads '
          f'({self.n_kv_heads}) for grouped-query attention.')
    if self.head_dim % 2:
      raise ValueError(f'head_dim must be even for rotary embeddings, got {self.head_dim}.')


# ---- hook sites ---------------------------------------------------------------


def valid_sites(n_layers: int) -> list[str]:
  """All hook-site names of a model with `n_layers` blocks, in execution order."""
  sites = [EMBED_SITE]
  for layer in range(n_layers):
    sites += [f'blocks.{layer}.{kind}' for kind in BLOCK_SITES]
  return sites + [FINAL_SITE]


def parse_site(site: str, n_layers: int) -> tuple[Optional[int], str]:
  """Splits a site name into (layer, kind); layer is None for global sites.

  Raises:
    ValueError: the name is not one of `valid_sites(n_layers)`; the message
      lists the valid names and the closest matches.
  """
  if site in (EMBED_SITE, FINAL_SITE):
    return None, site
  match = _BLOCK_SITE_RE.match(site) if isinstance(site, str) else None
  if match and match.group(2) in BLOCK_SITES and int(match.group(1)) < n_layers:
    return int(match.group(1)), match.group(2)
  valid = valid_sites(n_layers)
  close = difflib.get_close_matches(str(site), valid, n=3)
  raise ValueError(
      f'Unknown hook site {site!r}. Valid sites ({len(valid)}) are '
      f'{EMBED_SITE!r}, {FINAL_SITE!r} and blocks.{{L}}.{{kind}} for L in '
      f'0..{n_layers - 1} and kind in {list(BLOCK_SITES)}: '
      f'{", ".join(valid)}.' + (f' Did you mean {close}?' if close else ''))


class TokenInfo(NamedTuple):
  """What a patch knows about the positions it changes; every field (batch, seq).

  Attributes:
    tokens: int32 token ids.
    positions: int32 position of each token in its sequence, counting real
      tokens only (left padding shifts nothing); the rotary positions.
    generated: bool, the token was generated (it follows the prompt).
    valid: bool, a real token (False for padding).
  """
  tokens: jax.Array
  positions: jax.Array
  generated: jax.Array
  valid: jax.Array


class Patch:
  """What changes the activation at one hook site: `patch(x, tokens) -> x'`.

  Subclasses are frozen dataclasses registered as JAX pytrees
  (`jax.tree_util.register_dataclass`), with a static `site`: their array fields
  are traced arguments of the compiled program, their static fields part of its
  key. `__call__` gets the activation x (batch, seq, d_model) and a `TokenInfo`
  and returns an array of x's shape (cast back to x's dtype). `check` runs
  eagerly, before tracing, and raises ValueError for a patch that does not fit
  the model (a vector of the wrong width).
  """
  site: str

  def __call__(self, x: jax.Array, tokens: TokenInfo) -> jax.Array:
    raise NotImplementedError

  def check(self, cfg: 'LlamaConfig') -> None:
    del cfg


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=['site', 'fn'])
@dataclasses.dataclass(frozen=True)
class FunctionPatch(Patch):
  """A plain function `fn(x) -> x'` at `site`; part of the compiled program's key by identity."""
  site: str
  fn: PatchFn

  def __call__(self, x, tokens):
    del tokens
    return self.fn(x)


class Hooks(NamedTuple):
  """Reads and patches of one layer (or of the global sites), keyed by kind."""
  reads: frozenset
  patches: Mapping[str, tuple]  # kind -> Patch objects, applied in order

  def apply(self, kind: str, x: jax.Array, acts: dict, tokens: TokenInfo) -> jax.Array:
    """Applies the patches at `kind` to x, records x if `kind` is read; returns x."""
    for patch in self.patches.get(kind, ()):
      y = patch(x, tokens)
      if getattr(y, 'shape', None) != x.shape:
        raise ValueError(f'The patch {type(patch).__name__} at {patch.site!r} returned shape '
                         f'{getattr(y, "shape", type(y))}; expected {x.shape}.')
      x = y.astype(x.dtype)
    if kind in self.reads:
      acts[kind] = x
    return x


NO_HOOKS = Hooks(frozenset(), {})


def as_patches(patches: Optional[Mapping[str, PatchFn]] = None,
               interventions: Sequence[Patch] = ()) -> tuple:
  """One tuple of `Patch` objects: `patches`' functions (sorted by site), then `interventions`.

  Raises:
    TypeError: a function patch that is not callable, or an intervention that is not a `Patch`.
  """
  out = []
  for site, fn in sorted((patches or {}).items(), key=lambda item: str(item[0])):
    if not callable(fn):
      raise TypeError(f'The patch for site {site!r} must be a callable fn(x) -> x, got {type(fn)}.')
    out.append(FunctionPatch(site, fn))
  for patch in interventions:
    if not isinstance(patch, Patch):
      raise TypeError(f'An intervention must be a dictlearn.lm.llama.Patch (see '
                      f'dictlearn.analysis.steering), got {type(patch)}.')
    out.append(patch)
  return tuple(out)


def group_hooks(cfg: LlamaConfig, read_sites: Sequence[str], patches: Sequence[Patch]) -> dict:
  """Groups read sites and patches by layer: {layer or None: Hooks}.

  Args:
    cfg: the model.
    read_sites: hook sites to record.
    patches: `Patch` objects (see `as_patches`); several at one site apply in order.

  Raises:
    ValueError: an unknown site name (listing the valid ones), or a patch whose
      `check` refuses the model.
  """
  reads, fns = {}, {}
  for site in read_sites:
    layer, kind = parse_site(site, cfg.n_layers)
    reads.setdefault(layer, set()).add(kind)
  for patch in patches:
    layer, kind = parse_site(patch.site, cfg.n_layers)
    patch.check(cfg)
    kinds = fns.setdefault(layer, {})
    kinds[kind] = kinds.get(kind, ()) + (patch,)
  return {layer: Hooks(frozenset(reads.get(layer, ())), fns.get(layer, {}))
          for layer in set(reads) | set(fns)}


# ---- layer maths ----------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, returned in the input dtype."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotary angles, shape (batch, seq, 1, head_dim // 2)."""
  half = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_base ** (np.arange(half, dtype=np.float32) * 2.0 / cfg.head_dim))
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates (batch, seq, heads, head_dim) in the half-split (Hugging Face) layout."""
  half = x.shape[-1] // 2
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _matmul(spec: str, a, b):
  """`jnp.einsum` with float32 accumulation, the result in the operands' dtype.

  The same values for float32; for bfloat16 operands a float32 result is both the
  more exact sum and, on CPUs (AMX, AVX-512 BF16), the fast path: XLA's bfloat16
  product with a bfloat16 result runs at under half the speed of float32
  (tools/bench_harvest.py --dtype bfloat16).
  """
  out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  return out.astype(jnp.result_type(a, b))


def _attend(cfg: LlamaConfig, q, k, v, mask):
  """Grouped-query attention without repeating the key/value heads.

  Args:
    q: (batch, seq, n_heads, head_dim).
    k, v: (batch, n_kv_heads, keys, head_dim).
    mask: bool (batch, seq, keys); True where a query may see a key.

  Returns:
    (batch, seq, n_heads, head_dim).
  """
  b, t, _, hd = q.shape
  n_kv, groups, s = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, k.shape[2]
  # Query head h uses key/value head h // groups (Hugging Face repeat_kv order).
  # The queries of one kv head are stacked into one matrix, (groups * seq, head_dim):
  # a few large batched matmuls run much faster on CPU than many small ones. Batch
  # and kv head are one batch dimension: XLA's CPU backend runs a bfloat16 product
  # with two batch dimensions on float32 copies of its operands (with one, the
  # bfloat16 forward is 1.16x faster; BUILD_NOTES "Harvest").
  n = b * n_kv
  q = q.reshape(b, t, n_kv, groups, hd).transpose(0, 2, 3, 1, 4).reshape(n, groups * t, hd)
  scores = jnp.einsum('nqd,nsd->nqs', q, k.reshape(n, s, hd), preferred_element_type=jnp.float32)
  scores = scores.reshape(b, n_kv, groups, t, s) * (hd ** -0.5)
  # A fully masked row (a padding query) gets uniform weights, not NaN.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(n, groups * t, s)
  out = _matmul('nqs,nsd->nqd', probs, v.reshape(n, s, hd))
  return out.reshape(b, n_kv, groups, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, hd)


class _Context(NamedTuple):
  """What every layer of one call shares."""
  cos: jax.Array
  sin: jax.Array
  mask: jax.Array  # (batch, seq, keys) bool
  tokens: TokenInfo  # what patches see
  write_index: Any = 0  # where the new keys/values go in the cache
  attend_cache: bool = False  # attend over the whole cache instead of the new keys


def _block(cfg: LlamaConfig, lp: Params, x, ctx: _Context, layer, hooks: Hooks,
           cache: Optional[dict]):
  """One transformer block. Returns (x, cache, {kind: activation})."""
  acts = {}
  x = hooks.apply('hook_resid_pre', x, acts, ctx.tokens)

  h = rms_norm(x, lp['attn_norm'], cfg.rms_eps)
  q = _matmul('btd,dhk->bthk', h, lp['wq'])
  k = _matmul('btd,dhk->bthk', h, lp['wk'])
  v = _matmul('btd,dhk->bthk', h, lp['wv'])
  if 'bq' in lp:  # attention biases (Qwen2)
    q, k, v = q + lp['bq'], k + lp['bk'], v + lp['bv']
  q = apply_rope(q, ctx.cos, ctx.sin)
  # Keys and values head-major, (batch, n_kv_heads, seq, head_dim), as the cache holds them.
  k = apply_rope(k, ctx.cos, ctx.sin).transpose(0, 2, 1, 3)
  v = v.transpose(0, 2, 1, 3)
  if cache is not None:
    start = (layer, 0, 0, ctx.write_index, 0)
    cache = {
        'k': jax.lax.dynamic_update_slice(cache['k'], k[None].astype(cache['k'].dtype), start),
        'v': jax.lax.dynamic_update_slice(cache['v'], v[None].astype(cache['v'].dtype), start),
    }
    if ctx.attend_cache:
      k = jax.lax.dynamic_index_in_dim(cache['k'], layer, 0, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(cache['v'], layer, 0, keepdims=False)
  attn = _attend(cfg, q, k, v, ctx.mask)
  attn_out = _matmul('bthk,hkd->btd', attn, lp['wo'])
  attn_out = hooks.apply('hook_attn_out', attn_out, acts, ctx.tokens)
  x = hooks.apply('hook_resid_mid', x + attn_out, acts, ctx.tokens)

  h = rms_norm(x, lp['mlp_norm'], cfg.rms_eps)
  gate = _matmul('btd,df->btf', h, lp['w_gate'])
  up = _matmul('btd,df->btf', h, lp['w_up'])
  mlp_out = _matmul('btf,fd->btd', jax.nn.silu(gate) * up, lp['w_down'])
  mlp_out = hooks.apply('hook_mlp_out', mlp_out, acts, ctx.tokens)
  x = hooks.apply('hook_resid_post', x + mlp_out, acts, ctx.tokens)
  return x, cache, acts


def _layer_params(layers: Params, layer) -> Params:
  # Indexing inside the loop (rather than slicing the stack before it) keeps XLA
  # from copying the weights of a scanned segment on every call.
  return jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, layer, 0, keepdims=False), layers)


def _run_layers(cfg: LlamaConfig, layers: Params, x, ctx: _Context, n_run: int,
                hooks: Mapping[Optional[int], Hooks], cache: Optional[dict]):
  """Runs blocks [0, n_run): scans over plain layers, hooked layers on their own."""
  acts = {}
  hooked = sorted(layer for layer in hooks if layer is not None and layer < n_run)

  def scan_segment(x, cache, start, stop):
    if stop <= start:
      return x, cache

    def body(carry, layer):
      x, cache = carry
      x, cache, _ = _block(cfg, _layer_params(layers, layer), x, ctx, layer, NO_HOOKS, cache)
      return (x, cache), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), jnp.arange(start, stop))
    return x, cache

  start = 0
  for layer in hooked:
    x, cache = scan_segment(x, cache, start, layer)
    x, cache, layer_acts = _block(cfg, _layer_params(layers, layer), x, ctx, layer,
                                  hooks[layer], cache)
    acts.update({f'blocks.{layer}.{kind}': a for kind, a in layer_acts.items()})
    start = layer + 1
  x, cache = scan_segment(x, cache, start, n_run)
  return x, cache, acts


def _deepest_layer(hooks: Mapping[Optional[int], Hooks]) -> int:
  """Blocks needed to produce every read site (-1 when only global sites are read)."""
  deepest = -1
  for layer, h in hooks.items():
    if h.reads and layer is not None:
      deepest = max(deepest, layer)
  return deepest


def unembed(params: Params, cfg: LlamaConfig, h: jax.Array) -> jax.Array:
  """Logits (float32) from final-normalised hidden states."""
  w = params['embed'] if cfg.tie_embeddings else params['unembed']
  spec = 'btd,vd->btv' if cfg.tie_embeddings else 'btd,dv->btv'
  return jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Position of each token counting only real tokens (left or right padding)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward_hidden(params: Params, cfg: LlamaConfig, tokens: jax.Array,
                   attention_mask: Optional[jax.Array], positions: Optional[jax.Array],
                   hooks: Mapping[Optional[int], Hooks], *, n_run: int,
                   generated: Optional[jax.Array] = None, cache: Optional[dict] = None,
                   write_index=0, attend_cache: bool = False,
                   key_mask: Optional[jax.Array] = None):
  """Embedding, blocks [0, n_run) and, when n_run == n_layers, the final norm.

  The traceable core of `forward` and of cached generation (`dictlearn.lm.generate`).

  Args:
    params, cfg: the model.
    tokens: int (batch, seq) token ids of this call.
    attention_mask: (batch, seq) real tokens (None: all real).
    positions: int (batch, seq) rotary positions (None: from the mask).
    hooks: `group_hooks(...)` of the reads and patches.
    n_run: blocks to run.
    generated: bool (batch, seq), tokens that follow the prompt, for patches (None: none).
    cache: {'k', 'v'} of (n_layers, batch, n_kv_heads, max_len, head_dim), or None.
    write_index: cache slot of this call's first token.
    attend_cache: attend over the whole cache rather than this call's keys.
    key_mask: bool (batch, seq, keys), replaces the causal mask over this call's
      own tokens (cache decoding).

  Returns:
    (hidden states after the final norm, or None when n_run < n_layers;
     {site: activation}; the updated cache).
  """
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), dtype=bool)
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    positions = positions_from_mask(attention_mask)
  if generated is None:
    generated = jnp.zeros((b, t), dtype=bool)
  cos, sin = rope_tables(cfg, positions)
  if key_mask is None:
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = causal[None] & attention_mask[:, None, :]
  else:
    mask = key_mask
  info = TokenInfo(tokens, positions.astype(jnp.int32), generated.astype(bool), attention_mask)
  ctx = _Context(cos, sin, mask, info, write_index, attend_cache)

  global_hooks = hooks.get(None, NO_HOOKS)
  acts = {}
  x = jnp.take(params['embed'], tokens, axis=0)
  x = global_hooks.apply(EMBED_SITE, x, acts, info)
  x, cache, block_acts = _run_layers(cfg, params['layers'], x, ctx, n_run, hooks, cache)
  acts.update(block_acts)
  h = None
  if n_run == cfg.n_layers:
    h = rms_norm(x, params['final_norm'], cfg.rms_eps)
    h = global_hooks.apply(FINAL_SITE, h, acts, info)
  return h, acts, cache


@functools.partial(jax.jit, static_argnames=('cfg', 'read_sites', 'return_logits',
                                             'stop_at_deepest'))
def _forward_jit(params, tokens, attention_mask, positions, prompt_lengths, patches, *, cfg,
                 read_sites, return_logits, stop_at_deepest):
  hooks = group_hooks(cfg, read_sites, patches)
  n_run = cfg.n_layers
  if not return_logits and stop_at_deepest and FINAL_SITE not in read_sites:
    n_run = _deepest_layer(hooks) + 1
  generated = None
  if prompt_lengths is not None:
    if positions is None:
      mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask
      positions = positions_from_mask(mask)
    generated = positions >= prompt_lengths[:, None]
  h, acts, _ = forward_hidden(params, cfg, tokens, attention_mask, positions, hooks, n_run=n_run,
                              generated=generated)
  logits = unembed(params, cfg, h) if return_logits else None
  return logits, acts


def forward(params: Params, cfg: LlamaConfig, tokens: jax.Array, *,
            attention_mask: Optional[jax.Array] = None,
            positions: Optional[jax.Array] = None,
            read_sites: Sequence[str] = (),
            patches: Optional[Mapping[str, PatchFn]] = None,
            interventions: Sequence[Patch] = (),
            prompt_lengths: Optional[jax.Array] = None,
            return_logits: bool = True,
            stop_at_deepest: bool = True) -> tuple[Optional[jax.Array], dict]:
  """Runs the model; reads and patches hook sites.

  Compiled once per (shapes, cfg, read sites, the static parts of the patches,
  flags). The arrays of `interventions` are traced: new strengths, vectors or
  bounds of the same shapes reuse the compiled program. A function of `patches`
  is part of the key by identity: reuse the same function object to reuse the
  program.

  Args:
    params: model parameters (see the module docstring).
    cfg: model hyperparameters.
    tokens: int (batch, seq) token ids.
    attention_mask: (batch, seq), 1/True for real tokens, 0/False for padding;
      left or right padding. Default: all real.
    positions: int (batch, seq) rotary positions. Default: the count of real
      tokens before each token (so left padding does not shift positions).
    read_sites: hook sites whose activations are returned.
    patches: {site: fn}; fn(x) -> x' replaces the activation at that site
      (same shape; cast back to the activation dtype). Applied before the
      interventions at the same site.
    interventions: `Patch` objects (`dictlearn.analysis.steering`), applied in
      order. Reading a patched site returns the patched activation.
    prompt_lengths: int (batch,), how many leading real tokens of each row are
      the prompt; the tokens after them count as generated for the patches
      (default: every token is prompt).
    return_logits: whether to compute the logits.
    stop_at_deepest: when `return_logits` is False, run only the blocks up to
      the deepest read site.

  Returns:
    (logits float32 (batch, seq, vocab) or None, {site: activation}).

  Raises:
    ValueError: an unknown site name (the message lists the valid ones), or an
      intervention that does not fit the model.
  """
  read_sites = tuple(sorted(set(read_sites)))
  patch_list = as_patches(patches, interventions)
  group_hooks(cfg, read_sites, patch_list)  # validate eagerly, outside the trace
  tokens = jnp.asarray(tokens, dtype=jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f'tokens must be (batch, seq), got shape {tokens.shape}.')
  if prompt_lengths is not None:
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if prompt_lengths.shape != tokens.shape[:1]:
      raise ValueError(f'prompt_lengths must be (batch,) = {tokens.shape[:1]}, got shape '
                       f'{prompt_lengths.shape}.')
  return _forward_jit(params, tokens, attention_mask, positions, prompt_lengths, patch_list,
                      cfg=cfg, read_sites=read_sites, return_logits=return_logits,
                      stop_at_deepest=stop_at_deepest)


# ---- losses -----------------------------------------------------------------------


def cross_entropy(logits: jax.Array, tokens: jax.Array,
                  mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean next-token negative log-likelihood (nats).

  Args:
    logits: (batch, seq, vocab) from `forward`.
    tokens: (batch, seq) the same token ids; position t predicts token t + 1.
    mask: (batch, seq), 1 for real tokens; a prediction counts when both its
      input and its target are real.

  Returns:
    Scalar float32.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  target = tokens[:, 1:]
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  if mask is None:
    return jnp.mean(nll)
  m = (mask[:, 1:] & mask[:, :-1]) if mask.dtype == bool else mask[:, 1:] * mask[:, :-1]
  m = m.astype(jnp.float32)
  return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def perplexity(params: Params, cfg: LlamaConfig, tokens: jax.Array,
               attention_mask: Optional[jax.Array] = None, **forward_kwargs) -> float:
  """exp(cross-entropy) of the model on `tokens` (batch, seq)."""
  tokens = jnp.asarray(tokens, dtype=jnp.int32)
  logits, _ = forward(params, cfg, tokens, attention_mask=attention_mask, **forward_kwargs)
  return float(jnp.exp(cross_entropy(logits, tokens, attention_mask)))
