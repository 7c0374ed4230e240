"""Text corpora for harvesting: indexed documents, packed into fixed-length contexts.

A corpus is named by a spec string (the `corpus` field of a harvest config): one
part, or several joined by '+', read in that order (a spec with a '+' that is
itself an existing path is that one path):

    builtin     The Python standard library's documentation topics,
                `pydoc_data.topics.topics`: one document per topic, in sorted topic
                order (79 topics, about 113K SmolLM2 tokens on CPython 3.11). Ships
                with every CPython, so it needs nothing else. Its text changes with
                the Python version, which is recorded with the corpus.
    generated   Text the harvested model writes itself: one document per reply to a
                chat prompt of `GENERATION_PROMPTS` (64 prompts on varied subjects:
                science, history, cooking, code, law, fiction, ...), greedy or seeded
                sampling, a few hundred tokens each. Generated once and cached in a
                JSONL file whose name hashes the model file (name and size), the
                prompts and the sampling settings (`generated_cache_path`).
    PATH.txt    One document: the whole file, UTF-8 (a leading byte-order mark is dropped).
    PATH.jsonl  One document per non-blank line, a JSON object whose `jsonl_field`
                (default 'text') is a string.
    DIRECTORY   Every .txt and .jsonl file below it, recursively, sorted by relative
                path; hidden files and directories (a leading '.') and other
                extensions are skipped.

Documents are numbered 0, 1, 2, ... across the parts, in spec order, and the
numbering is stable: an empty document keeps its number (and contributes no
token). `Corpus.documents(start)` starts at document `start` without decoding the
ones before it.

Packing (`pack_contexts`) follows SAELens: every context starts with BOS and
documents are concatenated with a BOS between them, so the stream is
`BOS d0 BOS d1 BOS d2 ...` cut into rows of `context_length`, each row starting
with its own BOS. A document that starts a context uses the context's BOS as its
separator (no double BOS), so every document's first token directly follows a BOS.
A document longer than a context continues in the next one (after that context's
BOS). The last context of a finite corpus may be shorter than `context_length`.
Each position carries its document index and its position in the document
(-1 for BOS), so a harvested row can be shown in its context; `PackState` marks
where a context starts, so packing can restart at any context boundary.
"""
import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pydoc_data.topics

from dictlearn import cache as cache_lib

log = logging.getLogger(__name__)

BUILTIN = 'builtin'
GENERATED = 'generated'
FILE_SUFFIXES = ('.txt', '.jsonl')

GENERATION_PROMPTS = (
    'Explain how volcanoes form and why some eruptions are explosive.',
    'Write a short story about a lighthouse keeper who finds a message in a bottle.',
    'Describe the rules of chess for a complete beginner.',
    'What is photosynthesis, and why does it matter for life on Earth?',
    'Give a recipe for a simple vegetable soup, with step-by-step instructions.',
    'Explain the causes of the French Revolution.',
    'Write a Python function that checks whether a string is a palindrome, and explain it.',
    'How does the human immune system fight a viral infection?',
    'Summarise the plot of a classic adventure novel of your choice.',
    'What are the main differences between a democracy and a monarchy?',
    'Explain compound interest with a worked example.',
    'Write a poem about autumn leaves.',
    'How do airplanes stay in the air?',
    'Describe a typical day in the life of a medieval farmer.',
    'What is a black hole, and how is one formed?',
    'Give advice to someone preparing for their first job interview.',
    'Explain what a database index is and when to use one.',
    'Describe the water cycle.',
    'What were the main achievements of the Roman Empire?',
    'Write a letter to a friend describing a trip to the mountains.',
    'How does a vaccine train the body to recognise a disease?',
    'Explain the theory of evolution by natural selection.',
    'What should a beginner know before planting a vegetable garden?',
    'Describe how a bill becomes a law.',
    'Explain the Pythagorean theorem and give a proof.',
    'Write a dialogue between a detective and a suspect.',
    'What causes the seasons on Earth?',
    'How do you make bread from scratch?',
    'Describe the history and rules of football (soccer).',
    'Explain how the internet routes a message from one computer to another.',
    'What is inflation, and how do central banks respond to it?',
    'Write a product description for a waterproof hiking backpack.',
    'Explain the difference between weather and climate.',
    'Describe the life cycle of a butterfly.',
    'What are the benefits of regular exercise?',
    'Explain recursion to a new programmer, with an example in JavaScript.',
    'Describe the architecture of a Gothic cathedral.',
    'What is the role of mitochondria in a cell?',
    'Write a fairy tale about a clever fox and a proud lion.',
    'How do tides work?',
    'Explain supply and demand with an example from a farmers market.',
    'Describe the main events of the Apollo 11 mission.',
    'What is machine learning, in simple terms?',
    'Give tips for learning a foreign language as an adult.',
    'Explain how a bicycle gear system works.',
    'Describe traditional Japanese tea ceremony customs.',
    'What is the difference between a virus and a bacterium?',
    'Write a speech for a school graduation ceremony.',
    'Explain how electricity reaches a home from a power plant.',
    'What was the Silk Road, and why was it important?',
    'Describe how to care for a houseplant that needs little light.',
    'Explain what prime numbers are and why they matter in cryptography.',
    'Write a news report about a small town festival.',
    'How do bees make honey?',
    'Explain the basics of music theory: scales, chords and rhythm.',
    'What are the pros and cons of renewable energy sources?',
    'Describe the plot and themes of a Shakespeare play of your choice.',
    'Explain how to solve a quadratic equation.',
    'What makes a good friend? Give examples.',
    'Describe the geography and climate of the Sahara desert.',
    'Write SQL to find the top five customers by total order value, and explain it.',
    'How does the heart pump blood through the body?',
    'Explain the rules and strategy of the game of Go.',
    'Describe what a court trial looks like from start to finish.',
)


class CorpusError(ValueError):
  """A corpus spec, file or document cannot be read as text documents."""


@dataclasses.dataclass(frozen=True)
class Document:
  """One document of a corpus.

  Attributes:
    index: its number in the corpus (0-based, stable).
    text: its text ('' for an empty document).
    source: where it came from ('pydoc:assert', 'PATH', 'PATH:LINE').
  """
  index: int
  text: str
  source: str


# ---- sources --------------------------------------------------------------------


def _decode(data, path, base_offset=0, where=''):
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    offset = base_offset + e.start
    raise CorpusError(
        f'{path}{where}: not UTF-8 text: invalid byte 0x{data[e.start]:02x} at byte offset '
        f'{offset} ({e.reason}); expected UTF-8 encoded text') from None


class _PydocSource:
  """Python's documentation topics, one document per topic, sorted by name."""

  def __init__(self):
    self._topics = pydoc_data.topics.topics
    self._keys = sorted(self._topics)

  def count(self):
    return len(self._keys)

  def documents(self, skip):
    for key in self._keys[skip:]:
      yield self._topics[key], f'pydoc:{key}'

  def describe(self):
    return {'source': BUILTIN, 'documents': len(self._keys),
            'python': sys.version.split()[0],
            'sha256': hashlib.sha256(json.dumps(
                [[k, self._topics[k]] for k in self._keys]).encode()).hexdigest()[:16]}


class _TextFile:
  """A .txt file: one document."""

  def __init__(self, path):
    self.path = path

  def count(self):
    return 1

  def documents(self, skip):
    if skip:
      return
    with open(self.path, 'rb') as f:
      data = f.read()
    text = _decode(data, self.path)
    yield (text[1:] if text.startswith('\ufeff') else text), self.path

  def describe(self):
    return {'source': self.path, 'bytes': os.path.getsize(self.path)}


class _JsonlFile:
  """A .jsonl file: one document per non-blank line, the text in `field`."""

  def __init__(self, path, field, name=None):
    self.path, self.field, self.name = path, field, name or path
    self._count = None

  def count(self):
    if self._count is None:
      with open(self.path, 'rb') as f:
        self._count = sum(1 for line in f if line.strip())
    return self._count

  def documents(self, skip):
    with open(self.path, 'rb') as f:
      offset, seen = 0, 0
      for line_number, raw in enumerate(f, start=1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
          continue
        seen += 1
        if seen <= skip:
          continue
        where = f', line {line_number}'
        line = _decode(raw, self.path, start, where).lstrip('\ufeff')
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise CorpusError(f'{self.path}{where}: not valid JSON ({e.msg} at column {e.colno}); '
                            'expected one JSON object per line') from None
        if not isinstance(obj, dict) or self.field not in obj:
          found = sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
          raise CorpusError(f'{self.path}{where}: no field {self.field!r} (found {found}); '
                            'set jsonl_field to the field that holds the text')
        text = obj[self.field]
        if not isinstance(text, str):
          raise CorpusError(f'{self.path}{where}: field {self.field!r} is a '
                            f'{type(text).__name__}; expected a string')
        yield text, f'{self.path}:{line_number}'

  def describe(self):
    info = {'source': self.name, 'bytes': os.path.getsize(self.path), 'jsonl_field': self.field}
    if self.name != self.path:
      info['path'] = self.path
    return info


def _file_source(path, jsonl_field):
  if path.endswith('.jsonl'):
    return _JsonlFile(path, jsonl_field)
  return _TextFile(path)


def _directory_files(root):
  """The .txt/.jsonl files below `root`, sorted by relative path; hidden ones skipped."""
  found = []
  for directory, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    for name in filenames:
      if not name.startswith('.') and name.endswith(FILE_SUFFIXES):
        path = os.path.join(directory, name)
        found.append((os.path.relpath(path, root).replace(os.sep, '/'), path))
  return [path for _, path in sorted(found)]


def parse_spec(spec):
  """Splits a corpus spec into parts ('builtin', 'generated' or a path).

  Raises:
    CorpusError: an empty spec, or a part that is neither a keyword nor an
      existing .txt/.jsonl file or directory.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise CorpusError(f'corpus spec {spec!r} is empty; expected {BUILTIN!r}, {GENERATED!r}, '
                      'a .txt/.jsonl file or a directory, or several joined by "+"')
  spec = spec.strip()
  plus_in_path = '+' in spec and os.path.exists(os.path.expanduser(spec))
  parts = [spec] if plus_in_path else spec.split('+')
  for part in parts:
    if part in (BUILTIN, GENERATED):
      continue
    path = os.path.expanduser(part)
    if not os.path.exists(path):
      raise CorpusError(f'corpus spec {spec!r}: part {part!r} is not {BUILTIN!r} or '
                        f'{GENERATED!r} and no such file or directory exists')
    if os.path.isfile(path) and not path.endswith(FILE_SUFFIXES):
      raise CorpusError(f'corpus spec {spec!r}: file {part!r} is not a .txt or .jsonl file')
  return parts


class Corpus:
  """An ordered, indexed sequence of documents named by a spec (see the module docstring)."""

  def __init__(self, spec, *, jsonl_field='text', generated_path=None):
    """Resolves the spec's parts to sources (reads no document yet).

    Args:
      spec: corpus spec string.
      jsonl_field: field of each .jsonl line that holds the text.
      generated_path: cache file of the 'generated' part (see `ensure_generated`);
        needed only when the spec names 'generated'.

    Raises:
      CorpusError: a bad spec, a directory without .txt/.jsonl files, or
        'generated' without `generated_path`.
    """
    self.spec, self.jsonl_field = spec, jsonl_field
    self.generated_path = generated_path
    self._sources = []
    for part in parse_spec(spec):
      if part == BUILTIN:
        self._sources.append(_PydocSource())
      elif part == GENERATED:
        if not generated_path:
          raise CorpusError(f'corpus spec {spec!r} names {GENERATED!r} but no cache file of '
                            'generated text was given')
        self._sources.append(_JsonlFile(generated_path, 'text', name=GENERATED))
      elif os.path.isdir(os.path.expanduser(part)):
        files = _directory_files(os.path.expanduser(part))
        if not files:
          raise CorpusError(f'corpus directory {part!r} holds no .txt or .jsonl files '
                            '(searched recursively; hidden files skipped)')
        self._sources += [_file_source(f, jsonl_field) for f in files]
      else:
        self._sources.append(_file_source(os.path.expanduser(part), jsonl_field))

  @property
  def needs_generation(self):
    """Whether the 'generated' part's cache file is still to be written."""
    return any(isinstance(s, _JsonlFile) and s.name == GENERATED and not os.path.isfile(s.path)
               for s in self._sources)

  def documents(self, start=0) -> Iterator[Document]:
    """Yields the documents from number `start` on, in order.

    Whole files before `start` are skipped without being read (a .jsonl file's
    non-blank lines are counted); documents before `start` are not decoded.

    Raises:
      CorpusError: a file that is not UTF-8 (file and byte offset), a .jsonl line
        that is not JSON or lacks the field (file, line number and field).
    """
    index = 0
    for source in self._sources:
      n = source.count()
      if index + n <= start:
        index += n
        continue
      skip = max(0, start - index)
      for offset, (text, where) in enumerate(source.documents(skip)):
        yield Document(index + skip + offset, text, where)
      index += n

  def check_not_empty(self):
    """Raises CorpusError unless some document has text; returns the first one's index."""
    for doc in self.documents():
      if doc.text:
        return doc.index
    raise CorpusError(f'corpus {self.spec!r} is empty: none of its documents has any text')

  def describe(self):
    """A JSON-able description: spec, field and each source (file sizes, counts)."""
    sources = [s.describe() for s in self._sources]
    fingerprint = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]
    if len(sources) > 16:  # a big directory: keep the manifest readable
      sources = sources[:16] + [{'more_files': len(sources) - 16}]
    return {'spec': self.spec, 'jsonl_field': self.jsonl_field, 'sources': sources,
            'fingerprint': fingerprint}


# ---- generated text ---------------------------------------------------------------


def _bytes(path):
  """Size of a file, or of the files directly inside a directory."""
  if not os.path.isdir(path):
    return os.path.getsize(path)
  files = (os.path.join(path, f) for f in sorted(os.listdir(path)))
  return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


def generated_cache_path(cache_dir, model_path, prompts, settings):
  """Cache file of generated text for a model file, a prompt list and settings.

  Args:
    cache_dir: directory of the cache ('' = `dictlearn.cache.cache_dir()`).
    model_path: the model file or directory; its name and size enter the key.
    prompts: the prompts.
    settings: JSON-able generation settings (max_new_tokens, temperature, seed, ...).

  Returns:
    CACHE_DIR/generated-KEY.jsonl
  """
  key = json.dumps({'model': os.path.basename(os.path.normpath(model_path)),
                    'bytes': _bytes(model_path),
                    'prompts': list(prompts), 'settings': settings}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(cache_dir or cache_lib.cache_dir(), f'generated-{digest}.jsonl')


def ensure_generated(path, prompts, generate_fn: Callable[[Sequence[str], int], Sequence[str]],
                     *, batch_size, seed):
  """Writes the generated-text cache file unless it exists.

  Replies are produced `batch_size` prompts at a time, batch i with seed
  `seed + i`, and appended to `path + '.partial'` after each batch, so an
  interrupted generation resumes at its last whole batch; the finished file is
  renamed into place (a present cache file is always complete).

  Args:
    path: the cache file (`generated_cache_path`).
    prompts: chat prompts.
    generate_fn: fn(prompts, seed) -> one reply text per prompt.
    batch_size: prompts per call of `generate_fn`.
    seed: base seed.

  Returns:
    `path`.
  """
  if os.path.isfile(path):
    return path
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  partial = path + '.partial'
  done = []
  if os.path.isfile(partial):
    with open(partial, encoding='utf-8') as f:
      for line in f:
        try:
          done.append(json.loads(line))
        except json.JSONDecodeError:
          break  # a line cut by a kill: regenerate from the batch it belongs to
    done = done[:len(done) // batch_size * batch_size]
  with open(partial, 'w', encoding='utf-8') as f:
    for record in done:
      f.write(json.dumps(record) + '\n')
    if done:
      log.info('generated corpus: resuming after %d of %d prompts', len(done), len(prompts))
    for i in range(len(done), len(prompts), batch_size):
      batch = list(prompts[i:i + batch_size])
      log.info('generated corpus: prompts %d-%d of %d', i, i + len(batch), len(prompts))
      replies = generate_fn(batch, seed + i // batch_size)
      for prompt, text in zip(batch, replies, strict=True):
        f.write(json.dumps({'prompt': prompt, 'text': text}) + '\n')
      f.flush()
  os.replace(partial, path)
  return path


# ---- packing ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackState:
  """Where a context starts: token `offset` of document `doc`, after `context` contexts."""
  doc: int = 0
  offset: int = 0
  context: int = 0

  def to_json(self):
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value):
    return cls(**value)


@dataclasses.dataclass(frozen=True)
class Context:
  """One packed context; arrays have `context_length` entries.

  Attributes:
    tokens: int32 token ids (BOS beyond `length`).
    doc: int32 document index of each position (for a BOS separator, the
      document it introduces); -1 beyond `length`.
    pos: int32 position in the document; -1 for BOS and beyond `length`.
    is_bos: bool, True where packing inserted a BOS token.
    length: positions in use (< context_length only at the end of the corpus).
    start: packing state before this context; `pack_contexts(start=start)`
      yields this context first.
    end: packing state after it.
  """
  tokens: np.ndarray
  doc: np.ndarray
  pos: np.ndarray
  is_bos: np.ndarray
  length: int
  start: PackState
  end: PackState

  def row_mask(self, exclude_bos):
    """bool [context_length]: the positions that become store rows."""
    mask = np.arange(len(self.tokens)) < self.length
    return mask & ~self.is_bos if exclude_bos else mask


def _tokenized(documents: Iterable[Document], encode_batch, group):
  """Yields (index, int32 tokens) of documents with text, tokenizing `group` at a time."""
  pending = []

  def encode(docs):
    for doc, ids in zip(docs, encode_batch([d.text for d in docs])):
      if len(ids):
        yield doc.index, np.asarray(ids, np.int32)

  try:
    for doc in documents:
      if doc.text:
        pending.append(doc)
      if len(pending) == group:
        yield from encode(pending)
        pending = []
  except CorpusError:
    # Hand out the documents read before the bad one first: what comes before the
    # error is packed (and harvested) as it would be without it.
    yield from encode(pending)
    raise
  if pending:
    yield from encode(pending)


def pack_contexts(corpus, encode_batch, bos_id, context_length, start=PackState(),
                  tokenize_group=32) -> Iterator[Context]:
  """Packs the corpus's documents into contexts (see the module docstring).

  Args:
    corpus: a `Corpus` (anything with `documents(start)`).
    encode_batch: fn(list of texts) -> list of token-id lists, without BOS.
    bos_id: the BOS token id.
    context_length: tokens per context, BOS included (>= 2).
    start: where to start (a `Context.start` or `Context.end` of an earlier run).
    tokenize_group: documents tokenized per `encode_batch` call.

  Yields:
    `Context`s, deterministically: the same corpus and arguments give the same
    contexts, and starting from a context's `start` gives it and all after it.

  Raises:
    CorpusError: from reading the documents.
    ValueError: context_length < 2 or a start state that does not fit the corpus.
  """
  if context_length < 2:
    raise ValueError(f'context_length must be at least 2 (BOS and a token), got {context_length}')
  stream = _tokenized(corpus.documents(start.doc), encode_batch, tokenize_group)
  current = next(stream, None)
  offset, n_contexts = start.offset, start.context
  if current is not None and offset and (current[0] != start.doc or offset >= len(current[1])):
    raise ValueError(f'pack state {start} does not fit the corpus: document {start.doc} '
                     f'has {len(current[1]) if current[0] == start.doc else 0} tokens')
  while current is not None:
    state = PackState(current[0], offset, n_contexts)
    tokens = np.full(context_length, bos_id, np.int32)
    doc = np.full(context_length, -1, np.int32)
    pos = np.full(context_length, -1, np.int32)
    is_bos = np.zeros(context_length, bool)
    is_bos[0], doc[0], n = True, current[0], 1
    while True:
      index, ids = current
      take = min(context_length - n, len(ids) - offset)
      tokens[n:n + take] = ids[offset:offset + take]
      doc[n:n + take] = index
      pos[n:n + take] = np.arange(offset, offset + take)
      n, offset = n + take, offset + take
      if offset == len(ids):
        current, offset = next(stream, None), 0
      if n == context_length or current is None:
        break
      # A document boundary inside the context: a BOS separator before the next one.
      tokens[n], is_bos[n], doc[n] = bos_id, True, current[0]
      n += 1
      if n == context_length:
        break
    n_contexts += 1
    end = (PackState(current[0], offset, n_contexts) if current is not None
           else PackState(int(doc[n - 1]) + 1, 0, n_contexts))
    yield Context(tokens, doc, pos, is_bos, n, state, end)
