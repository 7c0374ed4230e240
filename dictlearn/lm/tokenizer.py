"""The tokenizer and chat template of a model, from GGUF metadata or a Hugging Face directory.

From a GGUF file: a byte-level BPE built with the `tokenizers` package from
`tokenizer.ggml.tokens`, `.merges`, `.token_type` (control tokens such as
`<|im_start|>` become special tokens that are never split) and `.pre` (how text
is split before BPE, as llama.cpp does); the chat template from
`tokenizer.chat_template`.

From a Hugging Face directory: `tokenizer.json` loaded as it is (any model the
`tokenizers` package reads: byte-level BPE, Llama 2's SentencePiece-style BPE,
...); special tokens and the chat template from `tokenizer_config.json`.

ChatML templates (`<|im_start|>role\ncontent<|im_end|>\n`, SmolLM2's and
Qwen2's) are rendered directly, without jinja2.
"""
import json
import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4

# `tokenizer.ggml.pre` values whose pre-tokenizer is StarCoder's: every digit
# on its own, then GPT-2's split (llama.cpp llm_tokenizer_bpe; SmolLM2's own
# tokenizer.json does the same).
_DIGITS_THEN_GPT2 = ('smollm', 'starcoder', 'refact', 'codeshell', 'exaone', 'minerva',
                     'command-r')
_GPT2 = ('gpt-2', 'gpt2', 'default', '')
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = ('llama3', 'llama-v3', 'llama-bpe', 'smaug-bpe', 'dbrx', 'falcon3', 'pixtral')

_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)


def read_json(path: str) -> dict:
  """A JSON object from a file.

  Raises:
    ValueError: the file is not valid JSON or holds no object.
  """
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path!r} is not valid JSON: {e}') from e
  if not isinstance(data, dict):
    raise ValueError(f'{path!r} holds a JSON {type(data).__name__}; expected an object.')
  return data


def _pre_tokenizer(pre: str):
  if pre in _DIGITS_THEN_GPT2:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
  if pre in _LLAMA3:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  if pre not in _GPT2:
    log.warning('Unknown tokenizer.ggml.pre %r; splitting text as GPT-2 does. Known: %s.',
                pre, sorted(_DIGITS_THEN_GPT2 + _GPT2 + _LLAMA3))
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


class Tokenizer:
  """A `tokenizers` tokenizer with the model's special tokens and chat template.

  Attributes:
    bos_id: beginning-of-sequence token id (None if the model names none).
    eos_id: end-of-sequence token id (`<|im_end|>` for SmolLM2-Instruct).
    pad_id: padding token id (eos when the model names none).
    add_bos: whether `encode` prepends bos by default (GGUF's
      tokenizer.ggml.add_bos_token, Hugging Face's add_bos_token; False for SmolLM2).
    chat_template: the jinja source of the chat template ('' if none).
    tokens: the vocabulary strings, by id.
    vocab_size: number of tokens (the model's embedding may have more rows).
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: Optional[int], eos_id: Optional[int],
               pad_id: Optional[int] = None, add_bos: bool = False, chat_template: str = '',
               tokens: Optional[Sequence[str]] = None):
    """Wraps a `tokenizers.Tokenizer`; use `from_gguf` or `from_hf_dir` normally.

    Args:
      tok: the tokenizer (pre-tokenizer, model, decoder, added tokens).
      bos_id, eos_id, pad_id: special token ids (pad defaults to eos).
      add_bos: the default of `encode`'s add_bos.
      chat_template: the jinja source of the chat template.
      tokens: the vocabulary by id; default read from `tok`.

    Raises:
      ValueError: a special id outside the vocabulary.
    """
    if tokens is None:
      vocab = tok.get_vocab(with_added_tokens=True)
      tokens = [''] * (max(vocab.values(), default=-1) + 1)
      for token, i in vocab.items():
        tokens[i] = token
    self._tok = tok
    self.tokens = list(tokens)
    self.vocab_size = len(self.tokens)
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = eos_id if pad_id is None else pad_id
    self.add_bos = add_bos
    self.chat_template = chat_template
    for name, i in (('bos_id', bos_id), ('eos_id', eos_id), ('pad_id', self.pad_id)):
      if i is not None and not 0 <= i < self.vocab_size:
        raise ValueError(f'{name} {i} is outside the vocabulary of {self.vocab_size} tokens.')

  @classmethod
  def from_bpe(cls, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], *,
               bos_id: Optional[int], eos_id: Optional[int], pad_id: Optional[int] = None,
               add_bos: bool = False, pre: str = 'gpt2', chat_template: str = '') -> 'Tokenizer':
    """Builds the tokenizer from GGUF's fields.

    Args:
      tokens: the vocabulary by id.
      merges: BPE merges as 'left right' strings.
      token_types: llama.cpp token types (control tokens become special tokens).
      bos_id, eos_id, pad_id, add_bos, chat_template: as for `__init__`.
      pre: the tokenizer.ggml.pre name (how text is split before BPE).

    Raises:
      ValueError: a malformed merge, or a special id outside the vocabulary.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
      left, sep, right = merge.partition(' ')
      if not sep:
        raise ValueError(f'Malformed BPE merge {merge!r}: expected two tokens separated by a '
                         'space.')
      pairs.append((left, right))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                          byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    types = list(token_types) or [1] * len(tokens)
    tok.add_special_tokens([
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return cls(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
               chat_template=chat_template, tokens=tokens)

  @classmethod
  def from_gguf(cls, reader) -> 'Tokenizer':
    """Builds the tokenizer from an open `gguf.GGUFReader`.

    Raises:
      ValueError: the file has no tokenizer or a non byte-level one.
    """
    def get(key, default=None):
      field = reader.fields.get('tokenizer.' + key)
      return default if field is None else field.contents()

    path = reader.data.filename
    model = get('ggml.model')
    if model != 'gpt2':
      raise ValueError(
          f'{path!r} has tokenizer.ggml.model {model!r}; only byte-level BPE (\'gpt2\') is '
          'supported. Load with with_tokenizer=False and tokenize elsewhere.')
    return cls.from_bpe(get('ggml.tokens'), get('ggml.merges', []), get('ggml.token_type', []),
                        bos_id=get('ggml.bos_token_id'), eos_id=get('ggml.eos_token_id'),
                        pad_id=get('ggml.padding_token_id'),
                        add_bos=bool(get('ggml.add_bos_token', False)),
                        pre=get('ggml.pre', 'gpt2'), chat_template=get('chat_template', ''))

  @classmethod
  def from_hf_dir(cls, directory: str,
                  model_config: Optional[Mapping[str, Any]] = None) -> 'Tokenizer':
    """Loads `tokenizer.json` of a Hugging Face model directory.

    bos, eos and pad come from `tokenizer_config.json` (bos_token, ...), else
    from the model config's bos_token_id and eos_token_id; add_bos from its
    add_bos_token, else from whether tokenizer.json's post-processor prepends
    bos; the chat template from its chat_template, else `chat_template.jinja`.

    Args:
      directory: the model directory.
      model_config: its config.json, when already read.

    Raises:
      FileNotFoundError: no tokenizer.json in `directory`.
      ValueError: an unreadable file, or a special token not in the vocabulary.
    """
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{directory!r} has no tokenizer.json (the fast tokenizer of a '
                              'Hugging Face model); load with with_tokenizer=False to skip it.')
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise ValueError(f'Cannot read {path!r} as a tokenizers tokenizer.json: {e}') from e
    config_path = os.path.join(directory, 'tokenizer_config.json')
    settings = read_json(config_path) if os.path.isfile(config_path) else {}
    model_config = model_config or {}

    def special(key):
      token = settings.get(key)
      token = token.get('content') if isinstance(token, dict) else token
      if isinstance(token, str):
        i = tok.token_to_id(token)
        if i is None:
          raise ValueError(f'{config_path!r}: {key} {token!r} is not in the vocabulary of '
                           f'{path!r}.')
        return i
      i = model_config.get(key + '_id')
      return (i[0] if i else None) if isinstance(i, list) else i

    bos_id = special('bos_token')
    add_bos = settings.get('add_bos_token')
    if add_bos is None:  # Llama's post-processor prepends <s>; SmolLM2's adds nothing
      add_bos = (bos_id is not None and tok.encode('a').ids[:1] == [bos_id]
                 and tok.encode('a', add_special_tokens=False).ids[:1] != [bos_id])
    template = settings.get('chat_template') or ''
    if isinstance(template, list):  # named templates: use the default one
      template = next((t['template'] for t in template if t.get('name') == 'default'), '')
    jinja = os.path.join(directory, 'chat_template.jinja')
    if not template and os.path.isfile(jinja):
      with open(jinja, encoding='utf-8') as f:
        template = f.read()
    return cls(tok, bos_id=bos_id, eos_id=special('eos_token'), pad_id=special('pad_token'),
               add_bos=bool(add_bos), chat_template=template)

  # ---- text <-> ids ---------------------------------------------------------------

  def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
    """Token ids of `text`; special-token strings in it map to their ids.

    Args:
      text: the text.
      add_bos: prepend bos_id; default `self.add_bos`.
    """
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if self._wants_bos(add_bos):
      ids = [self.bos_id] + ids
    return ids

  def encode_batch(self, texts: Sequence[str], add_bos: Optional[bool] = None) -> list[list[int]]:
    """`encode` of each text (parallel in the tokenizers library)."""
    batch = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
    if self._wants_bos(add_bos):
      batch = [[self.bos_id] + ids for ids in batch]
    return batch

  def _wants_bos(self, add_bos: Optional[bool]) -> bool:
    add_bos = self.add_bos if add_bos is None else add_bos
    if add_bos and self.bos_id is None:
      raise ValueError('add_bos requested but the tokenizer has no bos token.')
    return add_bos

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of token ids."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, i: int) -> str:
    """The vocabulary string of one token id."""
    return self.tokens[i]

  # ---- chat ------------------------------------------------------------------------

  @property
  def is_chatml(self) -> bool:
    """Whether the file's chat template is ChatML."""
    return '<|im_start|>' in self.chat_template

  def default_system_prompt(self) -> Optional[str]:
    """The system message the template inserts when the chat has none."""
    if "!= 'system'" not in self.chat_template and '!= "system"' not in self.chat_template:
      return None
    match = _CHATML_SYSTEM.search(self.chat_template)
    return match.group(1) if match else None

  def render_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = True) -> str:
    """Renders chat messages with the file's ChatML template.

    Args:
      messages: [{'role': 'system'|'user'|'assistant', 'content': str}, ...].
      add_generation_prompt: end with the opening of an assistant turn.

    Raises:
      ValueError: the template is not ChatML, or a message is malformed.
    """
    if not self.is_chatml:
      raise ValueError('Only ChatML chat templates (<|im_start|>role ... <|im_end|>) are '
                       f'rendered; this file\'s template starts {self.chat_template[:80]!r}.')
    parts = []
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or not isinstance(m.get('role'), str) or not isinstance(
          m.get('content'), str):
        raise ValueError(f'Chat message {i} must be a dict with str "role" and "content"; got {m!r}.')
      if i == 0 and m['role'] != 'system':
        system = self.default_system_prompt()
        if system is not None:
          parts.append(f'<|im_start|>system\n{system}<|im_end|>\n')
      parts.append(f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n')
    if add_generation_prompt:
      parts.append('<|im_start|>assistant\n')
    return ''.join(parts)

  def encode_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `render_chat(messages)`."""
    return self.encode(self.render_chat(messages, add_generation_prompt))
