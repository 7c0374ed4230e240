"""Text generation with a key/value cache, greedy or sampled, with patches.

Prompts of different lengths are left-padded to a common length (rounded up to
a multiple of `PROMPT_BUCKET` so that nearby lengths share a compiled program);
positions count only real tokens, so a padded prompt sees exactly what it would
alone. The prefill runs the same blocks as `llama.forward` and writes every
layer's keys and values into a cache preallocated for prompt + new tokens;
then a `lax.while_loop` decodes one token per step until `max_new_tokens` or
until every row has produced eos. Prefill and loop are one jitted program per
(batch, prompt bucket, max_new_tokens, sampling mode, static parts of the patches);
the arrays of `interventions` are traced, so a sweep over strengths compiles once.

Patches (`{site: fn}` and `interventions`, as in `forward`) apply in the prefill
and in every decoding step, where the activation has sequence length 1. They see
each position's `TokenInfo`: in the prefill the prompt (generated False, padding
not valid), in a decoding step the one token fed, at its absolute position
(the prompt's real length + its index among the generated tokens), generated
True; so a patch can act on the prompt only, on the generated tokens only, or
on a window of positions, exactly as `forward(..., prompt_lengths=...)` does
over the same prompt and completion.
"""
import functools
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.lm import llama

PROMPT_BUCKET = 16


def _filter_logits(logits, top_k: int, top_p: float):
  """Masks all but the top-k tokens and the top-p nucleus (float32 logits)."""
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass before it is below top_p (the first always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def _next_token(logits, rng, *, greedy: bool, temperature, top_k: int, top_p: float):
  """Picks one token per row from (batch, vocab) float32 logits."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = _filter_logits(logits / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'greedy', 'top_k',
                                             'top_p'))
def _generate_jit(params, tokens, prompt_mask, rng, temperature, eos_id, pad_id, patches, *,
                  cfg, max_new_tokens, greedy, top_k, top_p):
  b, p = tokens.shape
  max_len = p + max_new_tokens
  hooks = llama.group_hooks(cfg, (), patches)
  dtype = params['embed'].dtype
  shape = (cfg.n_layers, b, cfg.n_kv_heads, max_len, cfg.head_dim)
  cache = {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
  pick = functools.partial(_next_token, greedy=greedy, temperature=temperature, top_k=top_k,
                           top_p=top_p)

  # ---- prefill: the whole prompt, keys and values into cache[:, :, :p] ----
  h, _, cache = llama.forward_hidden(params, cfg, tokens, prompt_mask, None, hooks,
                                    n_run=cfg.n_layers, cache=cache, write_index=0)
  logits = llama.unembed(params, cfg, h[:, -1:])[:, 0]
  rng, sub = jax.random.split(rng)
  first = pick(logits, sub)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = first == eos_id
  key_valid = jnp.concatenate([prompt_mask, jnp.zeros((b, max_new_tokens), bool)], axis=1)
  prompt_len = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)

  # ---- decode: feed token i - 1 at cache slot p + i - 1, pick token i ----
  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, cache, key_valid, out, done, rng = state
    slot = p + i - 1
    token = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1)  # (b, 1)
    key_valid = jax.lax.dynamic_update_index_in_dim(key_valid, jnp.ones((b,), bool), slot, 1)
    positions = (prompt_len + i - 1)[:, None]
    h, _, cache = llama.forward_hidden(params, cfg, token, None, positions, hooks,
                                      n_run=cfg.n_layers, generated=jnp.ones((b, 1), bool),
                                      cache=cache, write_index=slot, attend_cache=True,
                                      key_mask=key_valid[:, None, :])
    logits = llama.unembed(params, cfg, h)[:, 0]
    rng, sub = jax.random.split(rng)
    nxt = jnp.where(done, pad_id, pick(logits, sub))
    out = jax.lax.dynamic_update_index_in_dim(out, nxt, i, 1)
    return i + 1, cache, key_valid, out, done | (nxt == eos_id), rng

  state = (jnp.int32(1), cache, key_valid, out, done, rng)
  _, _, _, out, _, _ = jax.lax.while_loop(cond, body, state)
  return out


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int,
             bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to a common length rounded up to `bucket`.

  Returns:
    (tokens int32 (batch, length), mask bool (batch, length)).
  """
  longest = max(len(p) for p in prompts)
  length = -(-longest // bucket) * bucket
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, length - len(prompt):] = prompt
      mask[row, length - len(prompt):] = True
  return tokens, mask


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, width: Optional[int] = None,
              bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to `width` (default: the longest, rounded up to `bucket`).

  Returns:
    (tokens int32 (batch, width), mask bool (batch, width)).

  Raises:
    ValueError: no sequences, or one longer than `width`.
  """
  if not seqs:
    raise ValueError('pad_right needs at least one sequence.')
  longest = max(len(s) for s in seqs)
  width = width or -(-longest // bucket) * bucket
  if longest > width:
    raise ValueError(f'A sequence of {longest} tokens does not fit the width {width}.')
  tokens = np.full((len(seqs), width), pad_id, np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for row, s in enumerate(seqs):
    tokens[row, :len(s)], mask[row, :len(s)] = s, True
  return tokens, mask


def generate(params: llama.Params, cfg: llama.LlamaConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, eos_id: Optional[int], pad_id: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             patches: Optional[Mapping[str, llama.PatchFn]] = None,
             interventions: Sequence[llama.Patch] = (),
             prompt_bucket: int = PROMPT_BUCKET) -> list[list[int]]:
  """Continues each prompt; greedy when temperature is 0, sampled otherwise.

  Args:
    params: model parameters.
    cfg: model config.
    prompts: token-id lists, of any (non-zero) lengths.
    max_new_tokens: tokens generated at most per prompt.
    eos_id: a row stops after producing it (None: never stop early).
    pad_id: filler token for padding (never attended to).
    temperature: softmax temperature; 0 picks the argmax.
    top_k: sample among the k most likely tokens only (0: all).
    top_p: sample from the smallest set of tokens with this much mass (1: all).
    seed: sampling seed.
    patches: {site: fn} applied in the prefill and every decoding step.
    interventions: `Patch` objects (`dictlearn.analysis.steering`), applied
      after `patches`, in order; their arrays are traced (no recompilation for
      new values of the same shapes).
    prompt_bucket: prompts are left-padded to a multiple of this (1: to the
      longest prompt exactly); fewer distinct lengths, fewer compilations.

  Returns:
    For each prompt, the new tokens, cut before the first eos.

  Raises:
    ValueError: empty prompt, a context longer than `cfg.context_length`, bad
      sampling arguments, an unknown site or an intervention that does not fit
      the model.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('generate needs at least one prompt and no empty prompt '
                     f'(got lengths {[len(p) for p in prompts]}).')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f'Need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, '
                     f'{top_k}, {top_p}.')
  tokens, mask = pad_left(prompts, pad_id, prompt_bucket)
  if tokens.shape[1] + max_new_tokens > cfg.context_length:
    raise ValueError(f'Prompt ({tokens.shape[1]} padded) + {max_new_tokens} new tokens exceeds '
                     f'the context length {cfg.context_length}.')
  patch_list = llama.as_patches(patches, interventions)
  llama.group_hooks(cfg, (), patch_list)  # validate sites and patches eagerly
  out = _generate_jit(params, jnp.asarray(tokens), jnp.asarray(mask),
                      jax.random.PRNGKey(seed), jnp.float32(max(temperature, 1e-6)),
                      jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id), patch_list,
                      cfg=cfg, max_new_tokens=int(max_new_tokens), greedy=temperature == 0,
                      top_k=int(top_k), top_p=float(top_p))
  out = np.asarray(out)
  results = []
  for row in out:
    row = row.tolist()
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    results.append(row)
  return results


def chat(params: llama.Params, cfg: llama.LlamaConfig, tokenizer, messages, *,
         max_new_tokens: int = 64, **kwargs) -> list[str]:
  """Assistant replies to one or more chats (greedy unless `temperature` > 0).

  Args:
    params, cfg: the model.
    tokenizer: a `dictlearn.lm.tokenizer.Tokenizer` with a ChatML template.
    messages: a user message (str), a chat (list of {'role', 'content'}), or a
      list of either.
    max_new_tokens: tokens generated at most per reply.
    **kwargs: passed to `generate` (temperature, top_k, top_p, seed, patches,
      interventions).

  Returns:
    One reply per chat.
  """
  if isinstance(messages, str) or (messages and isinstance(messages[0], Mapping)):
    messages = [messages]
  chats = [[{'role': 'user', 'content': m}] if isinstance(m, str) else m for m in messages]
  prompts = [tokenizer.encode_chat(c) for c in chats]
  out = generate(params, cfg, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                 pad_id=tokenizer.pad_id, **kwargs)
  return [tokenizer.decode(ids, skip_special_tokens=True) for ids in out]
