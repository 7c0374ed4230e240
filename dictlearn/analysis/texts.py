"""Texts the model writes for the analysis experiments, generated once and cached.

The emotion experiment asks the model for stories about each emotion, the persona
axis asks it to answer questions in character, the on-policy experiment reads its
own replies. Each set is generated with `dictlearn.lm.generate.chat` and cached
exactly as the `generated` corpus is (`dictlearn.data.corpus.generated_cache_path`
and `ensure_generated`): one JSONL file in `dictlearn.cache.cache_dir()` (or
`cache_dir`) whose name hashes the model file (name and size), the chats and the
sampling settings; written batch by batch to a `.partial` file, so an interrupted
generation resumes at its last whole batch, and renamed into place when complete.
The same chats and settings read the file back without running the model.
"""
import dataclasses
import json
import logging
import os
from typing import Sequence

from dictlearn.analysis import activations
from dictlearn.data import corpus as corpus_lib
from dictlearn.lm import generate as generate_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How replies are generated; every field enters the cache key.

  Attributes:
    max_new_tokens: tokens generated at most per reply.
    temperature: softmax temperature; 0 = greedy.
    top_p: nucleus mass (with temperature > 0).
    batch_size: chats generated together (batch i is sampled with seed + i).
    seed: base sampling seed.
  """
  max_new_tokens: int
  temperature: float = 0.8
  top_p: float = 0.95
  batch_size: int = 16
  seed: int = 0

  @classmethod
  def from_config(cls, config) -> 'Sampling':
    """From a ConfigDict with the same fields."""
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


def cache_path(chats: Sequence, sampling: Sampling, *, model_path: str, cache_dir: str = '') -> str:
  """The cache file of these chats' replies (see the module docstring)."""
  return corpus_lib.generated_cache_path(cache_dir, model_path, [activations.as_chat(c)
                                                                 for c in chats],
                                         dataclasses.asdict(sampling))


def model_replies(model, chats: Sequence, sampling: Sampling, *, model_path: str,
                  cache_dir: str = '') -> list[str]:
  """The model's reply to each chat: read from the cache, or generated and cached.

  Args:
    model: (cfg, params, tokenizer) loaded from `model_path`.
    chats: user messages (str) or chats (lists of {'role', 'content'}).
    sampling: generation settings.
    model_path: the GGUF file the model was loaded from (it names the cache).
    cache_dir: cache directory; '' = `dictlearn.cache.cache_dir()`.

  Returns:
    One reply per chat, in order.

  Raises:
    ValueError: no chats; a cache file that does not hold these chats.
  """
  if chats is None or len(chats) == 0:
    raise ValueError('model_replies: the chat set is empty; expected at least one prompt.')
  chats = [activations.as_chat(c) for c in chats]
  path = cache_path(chats, sampling, model_path=model_path, cache_dir=cache_dir)
  if not os.path.isfile(path):
    cfg, params, tokenizer = model
    log.info('generating %d replies (up to %d tokens each) into %s', len(chats),
             sampling.max_new_tokens, path)

    def generate_fn(batch, seed):
      return generate_lib.chat(params, cfg, tokenizer, list(batch),
                               max_new_tokens=sampling.max_new_tokens,
                               temperature=sampling.temperature,
                               top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                               seed=seed)

    corpus_lib.ensure_generated(path, chats, generate_fn, batch_size=sampling.batch_size,
                                seed=sampling.seed)
  with open(path, encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  if [r['prompt'] for r in records] != chats:
    raise ValueError(f'{path}: the cached replies are not those of the {len(chats)} chats asked '
                     f'for (found {len(records)} records); delete the file to regenerate it.')
  return [r['text'] for r in records]
