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

A site can be read (`read_sites`) or patched (`patches={site: fn}`, `fn(x) ->
x'` applied to the activation before anything downstream sees it). Layers that
carry a hook run on their own, between scans over the plain layers around them
(`scan [0, L)`, `layer L`, `scan (L, n)`), so a hook costs nothing at run time
and only one extra layer body at compile time.

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


class _Hooks(NamedTuple):
  """Reads and patches of one layer (or of the global sites), keyed by kind."""
  reads: frozenset
  patches: Mapping[str, PatchFn]

  def apply(self, kind: str, x: jax.Array, acts: dict) -> jax.Array:
    fn = self.patches.get(kind)
    if fn is not None:
      y = fn(x)
      if getattr(y, 'shape', None) != x.shape:
        raise ValueError(f'The patch at {kind!r} returned shape '
                         f'{getattr(y, "shape", type(y))}; expected {x.shape}.')
      x = y.astype(x.dtype)
    if kind in self.reads:
      acts[kind] = x
    return x


_NO_HOOKS = _Hooks(frozenset(), {})


def _group_hooks(cfg: LlamaConfig, read_sites: Sequence[str],
                 patches: Sequence[tuple[str, PatchFn]]) -> dict:
  """Groups sites by layer: {layer or None: _Hooks}."""
  reads, fns = {}, {}
  for site in read_sites:
    layer, kind = parse_site(site, cfg.n_layers)
    reads.setdefault(layer, set()).add(kind)
  for site, fn in patches:
    layer, kind = parse_site(site, cfg.n_layers)
    if not callable(fn):
      raise TypeError(f'The patch for site {site!r} must be a callable fn(x) -> x, got {type(fn)}.')
    fns.setdefault(layer, {})[kind] = fn
  return {layer: _Hooks(frozenset(reads.get(layer, ())), fns.get(layer, {}))
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
  # a few large batched matmuls run much faster on CPU than many small ones.
  q = q.reshape(b, t, n_kv, groups, hd).transpose(0, 2, 3, 1, 4).reshape(b, n_kv, groups * t, hd)
  scores = jnp.einsum('bkqd,bksd->bkqs', q, k, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, n_kv, groups, t, s) * (hd ** -0.5)
  # A fully masked row (a padding query) gets uniform weights, not NaN.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, n_kv, groups * t, s)
  out = jnp.einsum('bkqs,bksd->bkqd', probs, v)
  return out.reshape(b, n_kv, groups, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, hd)


class _Context(NamedTuple):
  """What every layer of one call shares."""
  cos: jax.Array
  sin: jax.Array
  mask: jax.Array  # (batch, seq, keys) bool
  write_index: Any = 0  # where the new keys/values go in the cache
  attend_cache: bool = False  # attend over the whole cache instead of the new keys


def _block(cfg: LlamaConfig, lp: Params, x, ctx: _Context, layer, hooks: _Hooks,
           cache: Optional[dict]):
  """One transformer block. Returns (x, cache, {kind: activation})."""
  acts = {}
  x = hooks.apply('hook_resid_pre', x, acts)

  h = rms_norm(x, lp['attn_norm'], cfg.rms_eps)
  q = jnp.einsum('btd,dhk->bthk', h, lp['wq'])
  k = jnp.einsum('btd,dhk->bthk', h, lp['wk'])
  v = jnp.einsum('btd,dhk->bthk', h, lp['wv'])
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
  attn_out = jnp.einsum('bthk,hkd->btd', attn, lp['wo'])
  attn_out = hooks.apply('hook_attn_out', attn_out, acts)
  x = hooks.apply('hook_resid_mid', x + attn_out, acts)

  h = rms_norm(x, lp['mlp_norm'], cfg.rms_eps)
  gate = jnp.einsum('btd,df->btf', h, lp['w_gate'])
  up = jnp.einsum('btd,df->btf', h, lp['w_up'])
  mlp_out = jnp.einsum('btf,fd->btd', jax.nn.silu(gate) * up, lp['w_down'])
  mlp_out = hooks.apply('hook_mlp_out', mlp_out, acts)
  x = hooks.apply('hook_resid_post', x + mlp_out, acts)
  return x, cache, acts


def _layer_params(layers: Params, layer) -> Params:
  # Indexing inside the loop (rather than slicing the stack before it) keeps XLA
  # from copying the weights of a scanned segment on every call.
  return jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, layer, 0, keepdims=False), layers)


def _run_layers(cfg: LlamaConfig, layers: Params, x, ctx: _Context, n_run: int,
                hooks: Mapping[Optional[int], _Hooks], cache: Optional[dict]):
  """Runs blocks [0, n_run): scans over plain layers, hooked layers on their own."""
  acts = {}
  hooked = sorted(layer for layer in hooks if layer is not None and layer < n_run)

  def scan_segment(x, cache, start, stop):
    if stop <= start:
      return x, cache

    def body(carry, layer):
      x, cache = carry
      x, cache, _ = _block(cfg, _layer_params(layers, layer), x, ctx, layer, _NO_HOOKS, cache)
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


def _deepest_layer(hooks: Mapping[Optional[int], _Hooks]) -> int:
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


def _run(params, cfg, tokens, attention_mask, positions, hooks, *, n_run, cache=None,
         write_index=0, attend_cache=False, key_mask=None):
  """Embedding, blocks [0, n_run) and, when n_run == n_layers, the final norm.

  Returns (hidden states or None, activations, cache). `key_mask` (batch, keys)
  replaces the default causal mask over the call's own tokens (cache decoding).
  """
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), dtype=bool)
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    positions = positions_from_mask(attention_mask)
  cos, sin = rope_tables(cfg, positions)
  if key_mask is None:
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = causal[None] & attention_mask[:, None, :]
  else:
    mask = key_mask
  ctx = _Context(cos, sin, mask, write_index, attend_cache)

  global_hooks = hooks.get(None, _NO_HOOKS)
  acts = {}
  x = jnp.take(params['embed'], tokens, axis=0)
  x = global_hooks.apply(EMBED_SITE, x, acts)
  x, cache, block_acts = _run_layers(cfg, params['layers'], x, ctx, n_run, hooks, cache)
  acts.update(block_acts)
  h = None
  if n_run == cfg.n_layers:
    h = rms_norm(x, params['final_norm'], cfg.rms_eps)
    h = global_hooks.apply(FINAL_SITE, h, acts)
  return h, acts, cache


@functools.partial(jax.jit, static_argnames=('cfg', 'read_sites', 'patch_items',
                                             'return_logits', 'stop_at_deepest'))
def _forward_jit(params, tokens, attention_mask, positions, *, cfg, read_sites,
                 patch_items, return_logits, stop_at_deepest):
  hooks = _group_hooks(cfg, read_sites, patch_items)
  n_run = cfg.n_layers
  if not return_logits and stop_at_deepest and FINAL_SITE not in read_sites:
    n_run = _deepest_layer(hooks) + 1
  h, acts, _ = _run(params, cfg, tokens, attention_mask, positions, hooks, n_run=n_run)
  logits = unembed(params, cfg, h) if return_logits else None
  return logits, acts


def forward(params: Params, cfg: LlamaConfig, tokens: jax.Array, *,
            attention_mask: Optional[jax.Array] = None,
            positions: Optional[jax.Array] = None,
            read_sites: Sequence[str] = (),
            patches: Optional[Mapping[str, PatchFn]] = None,
            return_logits: bool = True,
            stop_at_deepest: bool = True) -> tuple[Optional[jax.Array], dict]:
  """Runs the model; reads and patches hook sites.

  Compiled once per (shapes, cfg, read sites, patch functions, flags). A patch
  function is part of that key by identity: reuse the same function object to
  reuse the compiled program. To vary a patch's values (a steering vector)
  without recompiling, call `forward` inside your own `jax.jit` and close the
  function over the traced value.

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
      (same shape; cast back to the activation dtype). Reading a patched site
      returns the patched activation.
    return_logits: whether to compute the logits.
    stop_at_deepest: when `return_logits` is False, run only the blocks up to
      the deepest read site.

  Returns:
    (logits float32 (batch, seq, vocab) or None, {site: activation}).

  Raises:
    ValueError: an unknown site name (the message lists the valid ones).
  """
  read_sites = tuple(sorted(set(read_sites)))
  patch_items = tuple(sorted((patches or {}).items(), key=lambda item: item[0]))
  _group_hooks(cfg, read_sites, patch_items)  # validate eagerly, outside the trace
  tokens = jnp.asarray(tokens, dtype=jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f'tokens must be (batch, seq), got shape {tokens.shape}.')
  return _forward_jit(params, tokens, attention_mask, positions, cfg=cfg,
                      read_sites=read_sites, patch_items=patch_items,
                      return_logits=return_logits, stop_at_deepest=stop_at_deepest)


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
