"""Activations and next-token distributions of token sequences, one array per text.

The analysis tools read a handful of texts at a time, each of its own length.
`read_activations` right-pads them into batches (lengths rounded up to
`LENGTH_BUCKET`, texts sorted by length so that a batch pads little), runs
`dictlearn.lm.forward` once per batch, and hands back each text's rows unpadded.
The model is causal, so right padding changes no real token's activation.

    model = lm.load_gguf()                                    # (cfg, params, tokenizer)
    tokens = encode_texts(model[2], ['Alice is tall.', 'Bob is short.'])
    acts = read_activations(model, tokens, ['blocks.12.hook_resid_post'])
    acts['blocks.12.hook_resid_post'][0]                      # (len(tokens[0]), d_model)

Plain text is read after BOS, as the harvest packs it (`encode_texts`); a reply is
read in its chat, after the ChatML prompt that produced it (`encode_replies`).
"""
import logging
from typing import Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from dictlearn.lm import llama

log = logging.getLogger(__name__)

# Padded lengths are multiples of this: nearby lengths share one compiled program.
LENGTH_BUCKET = 32


def encode_texts(tokenizer, texts: Sequence[str], *, bos: bool = True) -> list[list[int]]:
  """Token ids of plain texts, each after BOS (as harvested) unless `bos` is False.

  Raises:
    ValueError: no texts, or an empty text (named by its index).
  """
  check_texts(texts, 'texts')
  ids = tokenizer.encode_batch(list(texts), add_bos=bos and tokenizer.bos_id is not None)
  for i, row in enumerate(ids):
    if len(row) <= int(bos):
      raise ValueError(f'Text {i} ({texts[i]!r}) has no tokens; expected non-empty text.')
  return ids


def as_chat(prompt) -> list[dict]:
  """A user message (str) as a one-message chat; a chat (list of messages) unchanged."""
  return [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else list(prompt)


def encode_replies(tokenizer, chats: Sequence, replies: Sequence[str]
                   ) -> tuple[list[list[int]], list[int]]:
  """Token ids of each reply after its chat prompt, and where each reply starts.

  Args:
    tokenizer: a ChatML `dictlearn.lm.Tokenizer`.
    chats: user messages (str) or chats (lists of {'role', 'content'}).
    replies: one assistant reply per chat (may be written by anyone).

  Returns:
    (token lists: the rendered chat with its generation prompt, then the reply;
     the index of each reply's first token).

  Raises:
    ValueError: different numbers of chats and replies, none, or an empty reply.
  """
  check_texts(replies, 'replies')
  if len(chats) != len(replies):
    raise ValueError(f'Got {len(chats)} chats but {len(replies)} replies; expected one reply '
                     'per chat.')
  tokens, starts = [], []
  for i, (chat, reply) in enumerate(zip(chats, replies)):
    prompt = tokenizer.encode_chat(as_chat(chat))
    body = tokenizer.encode(reply)
    if not body:
      raise ValueError(f'Reply {i} is empty; expected the text of an assistant reply.')
    tokens.append(prompt + body)
    starts.append(len(prompt))
  return tokens, starts


def check_texts(texts, what: str) -> None:
  """Raises ValueError naming `what` when `texts` is empty or holds a non-string."""
  if isinstance(texts, str):
    raise ValueError(f'{what}: expected a list of texts, got one string ({texts[:40]!r}...).')
  if texts is None or len(texts) == 0:
    raise ValueError(f'{what}: the text set is empty; expected at least one text.')
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise ValueError(f'{what}[{i}]: expected a string, got {type(t).__name__}.')


def padded_batches(token_lists: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                   bucket: int = LENGTH_BUCKET
                   ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
  """Yields (indices, tokens int32 (b, L), mask bool (b, L)), right-padded, by length.

  Texts are taken in order of length so that each batch pads little; every batch
  but the last has `batch_size` rows (the last is padded with empty rows to that
  size, so one compiled program serves all batches of a length bucket).
  """
  order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
  for start in range(0, len(order), batch_size):
    indices = order[start:start + batch_size]
    longest = max(len(token_lists[i]) for i in indices)
    length = -(-longest // bucket) * bucket
    tokens = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for row, i in enumerate(indices):
      tokens[row, :len(token_lists[i])] = token_lists[i]
      mask[row, :len(token_lists[i])] = True
    yield indices, tokens, mask


def _check_token_lists(cfg: llama.LlamaConfig, token_lists) -> None:
  if token_lists is None or len(token_lists) == 0:
    raise ValueError('The text set is empty; expected at least one token sequence.')
  for i, ids in enumerate(token_lists):
    if len(ids) == 0:
      raise ValueError(f'Token sequence {i} is empty; expected at least one token.')
    if len(ids) > cfg.context_length:
      raise ValueError(f'Token sequence {i} has {len(ids)} tokens; the model reads at most '
                       f'{cfg.context_length}.')


def map_batches(model, token_lists: Sequence[Sequence[int]],
                fn: Callable[[jax.Array, jax.Array, list[int]], Mapping[str, jax.Array]], *,
                batch_size: int = 8, progress: bool = False, desc: str = 'reading'
                ) -> dict[str, list[np.ndarray]]:
  """Applies `fn(tokens, mask, indices) -> {name: (b, L, ...)}` to padded batches.

  `indices` are the rows' positions in `token_lists` (padding rows beyond them).

  Returns:
    {name: one array per token list, in the input order, cut to its length}.
  """
  cfg, _, tokenizer = model
  _check_token_lists(cfg, token_lists)
  out = {}
  batches = padded_batches(token_lists, batch_size, tokenizer.pad_id)
  total = -(-len(token_lists) // batch_size)
  for indices, tokens, mask in tqdm.tqdm(batches, total=total, desc=desc, disable=not progress):
    results = fn(jnp.asarray(tokens), jnp.asarray(mask), indices)
    results = {k: np.asarray(v) for k, v in results.items()}
    for name, value in results.items():
      rows = out.setdefault(name, [None] * len(token_lists))
      for row, i in enumerate(indices):
        rows[i] = value[row, :len(token_lists[i])]
  return out


def read_activations(model, token_lists: Sequence[Sequence[int]], sites: Sequence[str], *,
                     batch_size: int = 8, interventions: Sequence = (),
                     prompt_lengths: Optional[Sequence[int]] = None,
                     progress: bool = False) -> dict[str, list[np.ndarray]]:
  """Activations of each token sequence at each site (float32).

  Args:
    model: (cfg, params, tokenizer), as `dictlearn.lm.load_gguf` returns.
    token_lists: token ids, one list per text (`encode_texts`, `encode_replies`).
    sites: hook sites (`dictlearn.lm.valid_sites`).
    batch_size: sequences per forward pass.
    interventions: `dictlearn.analysis.steering` patches applied during the pass;
      a patched site reads its patched value.
    prompt_lengths: per sequence, how many leading tokens are the prompt (the
      rest count as generated for the interventions' spans); None: all prompt.
    progress: show a progress bar.

  Returns:
    {site: [float32 (len(tokens_i), d_model) per sequence]}.

  Raises:
    ValueError: an unknown site (the message lists the valid ones), no sites, or an
      empty set of sequences.
  """
  cfg, params, _ = model
  if isinstance(sites, str) or not sites:
    raise ValueError(f'sites: expected a non-empty list of hook-site names, got {sites!r}.')
  for site in sites:
    llama.parse_site(site, cfg.n_layers)

  def fn(tokens, mask, indices):
    lengths = None
    if prompt_lengths is not None:
      lengths = np.zeros(tokens.shape[0], np.int32)
      lengths[:len(indices)] = [prompt_lengths[i] for i in indices]
    _, acts = llama.forward(params, cfg, tokens, attention_mask=mask, read_sites=sites,
                            interventions=interventions, prompt_lengths=lengths,
                            return_logits=False)
    return {site: a.astype(jnp.float32) for site, a in acts.items()}

  return map_batches(model, token_lists, fn, batch_size=batch_size, progress=progress,
                     desc='activations')


@jax.jit
def _next_token_stats(logits, tokens):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  nll = jnp.concatenate([nll, jnp.full_like(nll[:, :1], jnp.nan)], axis=1)
  return {'entropy': entropy, 'nll': nll}


def next_token_stats(model, token_lists: Sequence[Sequence[int]], *, batch_size: int = 4,
                     interventions: Sequence = (), progress: bool = False
                     ) -> dict[str, list[np.ndarray]]:
  """The model's next-token distribution at every position of each sequence.

  `interventions` (`dictlearn.analysis.steering`) apply at every position.

  Returns:
    {'entropy': [float32 (n_i,)], 'nll': [float32 (n_i,)]} per sequence: at
    position t, the entropy (nats) of the distribution predicting token t + 1, and
    the negative log-likelihood of the token that follows (NaN at the last position).
  """
  cfg, params, _ = model

  def fn(tokens, mask, indices):
    del indices
    logits, _ = llama.forward(params, cfg, tokens, attention_mask=mask,
                              interventions=interventions)
    return _next_token_stats(logits, tokens)

  return map_batches(model, token_lists, fn, batch_size=batch_size, progress=progress,
                     desc='next-token stats')
