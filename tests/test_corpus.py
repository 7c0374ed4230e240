"""Corpus: sources, document indexing, bad input, the built-in corpus, packing."""
import json
import os

import numpy as np
import pytest

from dictlearn.data import corpus as corpus_lib


def _write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return str(path)


def _jsonl(rows):
  return ''.join(json.dumps(r) + '\n' for r in rows)


def _char_encode(texts):
  """A stand-in tokenizer: one token per character (ids = code points + 10)."""
  return [[ord(ch) + 10 for ch in t] for t in texts]


BOS = 1


# ---- sources ----------------------------------------------------------------------


def test_txt_jsonl_and_directory_sources(tmp_path):
  root = tmp_path / 'data'
  _write(root / 'b' / 'two.jsonl', _jsonl([{'text': 'second'}, {'text': 'third', 'id': 3}])
         + '\n  \n' + _jsonl([{'text': ''}, {'text': 'fifth'}]))
  _write(root / 'a.txt', '\ufefffirst doc\n')
  _write(root / 'c.txt', 'last')
  _write(root / 'notes.md', 'skipped: not .txt/.jsonl')
  _write(root / '.hidden' / 'x.txt', 'skipped: hidden')
  corpus = corpus_lib.Corpus(str(root))
  docs = list(corpus.documents())
  assert [d.text for d in docs] == ['first doc\n', 'second', 'third', '', 'fifth', 'last']
  assert [d.index for d in docs] == list(range(6))
  assert docs[1].source.endswith('two.jsonl:1') and docs[4].source.endswith('two.jsonl:6')
  # Restartable: any start gives the tail, whole files before it are skipped.
  for start in range(7):
    assert list(corpus.documents(start)) == docs[start:]
  assert corpus.check_not_empty() == 0
  # A single file, the '+' form and a custom field.
  single = corpus_lib.Corpus(_write(tmp_path / 'q.jsonl', _jsonl([{'body': 'x'}])),
                             jsonl_field='body')
  assert [d.text for d in single.documents()] == ['x']
  both = corpus_lib.Corpus(f'{root / "c.txt"}+{root / "a.txt"}')
  assert [d.text for d in both.documents()] == ['last', 'first doc\n']
  assert both.describe()['sources'][0]['bytes'] == 4


def test_jsonl_line_without_field_names_file_line_and_field(tmp_path):
  path = _write(tmp_path / 'd.jsonl', _jsonl([{'text': 'ok'}, {'content': 'no text'}]))
  docs = corpus_lib.Corpus(path).documents()
  assert next(docs).text == 'ok'
  with pytest.raises(corpus_lib.CorpusError,
                     match=r"d\.jsonl, line 2: no field 'text' \(found \['content'\]\)"):
    next(docs)
  bad_json = _write(tmp_path / 'e.jsonl', '{"text": "a"}\n{"text": \n')
  with pytest.raises(corpus_lib.CorpusError, match=r'e\.jsonl, line 2: not valid JSON'):
    list(corpus_lib.Corpus(bad_json).documents())
  not_str = _write(tmp_path / 'f.jsonl', _jsonl([{'text': 5}]))
  with pytest.raises(corpus_lib.CorpusError, match=r"line 1: field 'text' is a int"):
    list(corpus_lib.Corpus(not_str).documents())


def test_non_utf8_names_file_and_byte_offset(tmp_path):
  txt = _write(tmp_path / 'latin1.txt', 'caf'.encode() + b'\xe9 au lait')
  with pytest.raises(corpus_lib.CorpusError,
                     match=r'latin1\.txt: not UTF-8 text: invalid byte 0xe9 at byte offset 3'):
    list(corpus_lib.Corpus(txt).documents())
  jsonl = _write(tmp_path / 'bad.jsonl', b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  # Line 2 starts at byte 17; the bad byte is 13 bytes into it.
  with pytest.raises(corpus_lib.CorpusError, match=(
      r'bad\.jsonl, line 2: not UTF-8 text: invalid byte 0xe9 at byte offset 30')):
    list(corpus_lib.Corpus(jsonl).documents())


def test_empty_corpus_and_bad_specs(tmp_path):
  empty = _write(tmp_path / 'e.jsonl', _jsonl([{'text': ''}]) + '\n')
  with pytest.raises(corpus_lib.CorpusError, match='is empty'):
    corpus_lib.Corpus(empty).check_not_empty()
  (tmp_path / 'nothing').mkdir()
  _write(tmp_path / 'nothing' / 'readme.md', 'not a corpus file')
  with pytest.raises(corpus_lib.CorpusError, match=r'holds no \.txt or \.jsonl files'):
    corpus_lib.Corpus(str(tmp_path / 'nothing'))
  with pytest.raises(corpus_lib.CorpusError, match="part 'nope' is not 'builtin'"):
    corpus_lib.Corpus('builtin+nope')
  with pytest.raises(corpus_lib.CorpusError, match='is empty'):
    corpus_lib.Corpus('')
  with pytest.raises(corpus_lib.CorpusError, match=r'not a \.txt or \.jsonl file'):
    corpus_lib.Corpus(_write(tmp_path / 'x.csv', 'a,b'))
  with pytest.raises(corpus_lib.CorpusError, match='no cache file of generated text'):
    corpus_lib.Corpus('builtin+generated')


def test_builtin_corpus_is_nonempty_and_deterministic():
  a = list(corpus_lib.Corpus('builtin').documents())
  b = list(corpus_lib.Corpus('builtin').documents(start=10))
  assert len(a) > 50 and sum(len(d.text) for d in a) > 100_000
  assert a[10:] == b
  assert [d.source for d in a] == sorted(d.source for d in a)
  assert corpus_lib.Corpus('builtin').describe() == corpus_lib.Corpus('builtin').describe()


def test_generated_cache_is_written_once_and_resumes(tmp_path):
  model = _write(tmp_path / 'm.gguf', b'weights')
  prompts = ('p0', 'p1', 'p2', 'p3', 'p4')
  settings = {'max_new_tokens': 8, 'seed': 0}
  path = corpus_lib.generated_cache_path(str(tmp_path / 'cache'), model, prompts, settings)
  assert path != corpus_lib.generated_cache_path(str(tmp_path / 'cache'), model, prompts,
                                                 dict(settings, seed=1))
  calls = []

  def fake_generate(batch, seed):
    calls.append((list(batch), seed))
    if len(calls) == 2 and len(batch) == 2:
      raise KeyboardInterrupt  # killed mid-way: the first batch stays in .partial
    return [f'reply to {p} with seed {seed}' for p in batch]

  with pytest.raises(KeyboardInterrupt):
    corpus_lib.ensure_generated(path, prompts, fake_generate, batch_size=2, seed=7)
  assert not os.path.exists(path) and os.path.exists(path + '.partial')
  corpus_lib.ensure_generated(path, prompts, fake_generate, batch_size=2, seed=7)
  assert [c[0] for c in calls] == [['p0', 'p1'], ['p2', 'p3'], ['p2', 'p3'], ['p4']]
  assert [c[1] for c in calls] == [7, 8, 8, 9]
  n_calls = len(calls)
  corpus_lib.ensure_generated(path, prompts, fake_generate, batch_size=2, seed=7)
  assert len(calls) == n_calls  # cached
  corpus = corpus_lib.Corpus('generated', generated_path=path)
  assert [d.text for d in corpus.documents()][-1] == 'reply to p4 with seed 9'
  assert not corpus.needs_generation


# ---- packing --------------------------------------------------------------------------


def test_packing_bos_separators_positions_and_restart(tmp_path):
  texts = ['abcdefghij', '', 'klm', 'nopqrstuvwxyz0123456789', 'AB']
  path = _write(tmp_path / 'd.jsonl', _jsonl([{'text': t} for t in texts]))
  corpus = corpus_lib.Corpus(path)
  length = 8
  contexts = list(corpus_lib.pack_contexts(corpus, _char_encode, BOS, length, tokenize_group=2))
  for c in contexts:
    assert c.tokens[0] == BOS and c.is_bos[0] and c.pos[0] == -1
  # Every context but the last is full; the stream is BOS d0 BOS d2 BOS d3 BOS d4, cut in
  # rows that each start with a BOS (a document starting a row uses the row's BOS).
  assert [c.length for c in contexts[:-1]] == [length] * (len(contexts) - 1)
  stream = np.concatenate([c.tokens[:c.length] for c in contexts])
  assert (stream == BOS).sum() == len(contexts) + 3 - sum(
      1 for c in contexts[1:] if c.pos[1] == 0)  # separators not at a row start
  # Non-BOS rows: token ids, documents and positions reproduce every document in order.
  rows = [(int(t), int(d), int(p)) for c in contexts
          for t, d, p, b in zip(c.tokens[:c.length], c.doc, c.pos, c.is_bos) if not b]
  expected = [(ord(ch) + 10, i, p) for i, t in enumerate(texts) for p, ch in enumerate(t)]
  assert rows == expected
  # A separator BOS belongs to the document it introduces.
  for c in contexts:
    for j in np.flatnonzero(c.is_bos[1:c.length]) + 1:
      if j + 1 < c.length:
        assert c.doc[j] == c.doc[j + 1] and c.pos[j + 1] == 0
  # Restart from any context's start (or the previous context's end) gives the same tail.
  for i, c in enumerate(contexts):
    for state in [c.start] + ([contexts[i - 1].end] if i else []):
      tail = list(corpus_lib.pack_contexts(corpus, _char_encode, BOS, length, start=state))
      assert len(tail) == len(contexts) - i
      for x, y in zip(tail, contexts[i:]):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.pos, y.pos)
        np.testing.assert_array_equal(x.doc, y.doc)
        assert (x.length, x.start, x.end) == (y.length, y.start, y.end)
  assert contexts[-1].row_mask(True).sum() == contexts[-1].length - contexts[-1].is_bos.sum()
  assert contexts[-1].row_mask(False).sum() == contexts[-1].length
  with pytest.raises(ValueError, match='at least 2'):
    next(corpus_lib.pack_contexts(corpus, _char_encode, BOS, 1))
