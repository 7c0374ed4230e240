"""Tables of sweep results: JSONL or CSV records, their columns, and `--where` filters.

    records, kind = load_records('runs/sweep/results.jsonl')
    records = select(records, ['n_latents<=32768', 'k==32'], path)
    n = column(records, 'n_latents', path)

A condition is `FIELD OP VALUE` with OP one of <=, >=, <, >, ==, != (= means
==). When VALUE is a number the field is compared as a number; otherwise only
== and != apply, to the field as text. Nothing is evaluated.
"""
import argparse
import csv
import dataclasses
import json
import math
import operator
import pathlib
import re
from typing import Any, Callable, Sequence

import numpy as np

_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    '<=': operator.le, '>=': operator.ge, '==': operator.eq, '!=': operator.ne,
    '<': operator.lt, '>': operator.gt, '=': operator.eq}
# The field is the shortest prefix before an operator; two-character operators first.
_CONDITION = re.compile(r'^\s*(?P<field>.+?)\s*(?P<op><=|>=|==|!=|<|>|=)\s*(?P<value>.*?)\s*$')


def load_records(path: str) -> tuple[list[dict], str]:
  """Reads a JSONL (one object per line) or CSV (by extension) results file.

  Returns:
    (records, kind) with kind 'csv' or 'jsonl'.

  Raises:
    ValueError: no such file, an unreadable line, or no records.
  """
  p = pathlib.Path(path)
  if not p.is_file():
    raise ValueError(f'results file {path} does not exist')
  if p.suffix.lower() == '.csv':
    with p.open(newline='') as f:
      records = list(csv.DictReader(f))
    kind = 'csv'
  else:
    records, kind = [], 'jsonl'
    with p.open() as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{number}: not valid JSON ({e.msg}); expected one JSON object '
                           'per line') from None
        if not isinstance(record, dict):
          raise ValueError(f'{path}:{number}: expected a JSON object, found '
                           f'{type(record).__name__}')
        records.append(record)
  if not records:
    raise ValueError(f'{path} holds no records')
  return records, kind


def _present(records: list[dict]) -> list[str]:
  return sorted({key for r in records for key in r})


def column(records: list[dict], name: str, path: str, numeric: bool = True) -> np.ndarray:
  """One column as an array; a missing or non-numeric value is an error naming the record."""
  if name not in _present(records):
    raise ValueError(f'{path}: no column {name!r}; columns present: {_present(records)}')
  values = []
  for i, r in enumerate(records):
    v = r.get(name)
    if v is None or v == '':
      raise ValueError(f'{path}: record {i + 1} has no value for column {name!r}')
    if numeric:
      try:
        v = float(v)
      except (TypeError, ValueError):
        raise ValueError(f'{path}: record {i + 1}, column {name!r}: expected a number, '
                         f'found {v!r}') from None
    values.append(v)
  return np.asarray(values, dtype=np.float64 if numeric else object)


@dataclasses.dataclass(frozen=True)
class Condition:
  """One `FIELD OP VALUE` test on a record (see the module docstring)."""
  field: str
  op: str
  value: float | str
  text: str

  def holds(self, record: dict, index: int, path: str) -> bool:
    """Whether `record` (the index-th, 0-based) passes.

    Raises:
      ValueError: the record lacks the field, or holds a non-number where a
        number is compared.
    """
    v = record.get(self.field)
    if v is None or v == '':
      raise ValueError(f'{path}: record {index + 1} has no value for {self.field!r} '
                       f'(in --where {self.text!r})')
    if isinstance(self.value, str):
      return _OPERATORS[self.op](str(v), self.value)
    try:
      v = float(v)
    except (TypeError, ValueError):
      raise ValueError(f'{path}: record {index + 1}, {self.field!r} is {v!r}, not a number, '
                       f'so --where {self.text!r} cannot compare it') from None
    return _OPERATORS[self.op](v, self.value)


def parse_condition(text: str) -> Condition:
  """Parses `FIELD OP VALUE`.

  Raises:
    ValueError: no operator, an empty field or value, or an ordering (<, >, ...)
      against a value that is not a number.
  """
  match = _CONDITION.match(text)
  if match is None or not match['field'] or not match['value']:
    raise ValueError(f'--where {text!r}: expected FIELD OP VALUE with OP one of '
                     "<=, >=, <, >, ==, != (e.g. 'n_latents<=32768')")
  field, op, raw = match['field'], match['op'], match['value']
  try:
    value: float | str = float(raw)
    if math.isnan(value):
      raise ValueError
  except ValueError:
    value = raw.strip('\'"')
    if op not in ('==', '!=', '='):
      raise ValueError(f'--where {text!r}: {op} needs a number, got {raw!r}; text fields take '
                       'only == and !=') from None
  return Condition(field, op, value, text)


def where_flag(text: str) -> str:
  """The argparse `type` of a --where flag: `text`, once it parses (else a usage error)."""
  try:
    parse_condition(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def select(records: list[dict], conditions: Sequence[str], path: str) -> list[dict]:
  """The records that pass every condition (all records when there is none).

  Raises:
    ValueError: a malformed condition, a field no record has (the message lists
      the fields present), a value that cannot be compared, or no record left.
  """
  parsed = [parse_condition(c) for c in conditions]
  present = _present(records)
  for c in parsed:
    if c.field not in present:
      raise ValueError(f'{path}: --where {c.text!r} names no column; columns present: {present}')
  kept = [r for i, r in enumerate(records) if all(c.holds(r, i, path) for c in parsed)]
  if parsed and not kept:
    raise ValueError(f'{path}: no record of {len(records)} passes '
                     f'{" and ".join(repr(c.text) for c in parsed)}')
  return kept


# Columns that name a run (bootstrap cluster), in order of preference.
GROUP_COLUMNS = ('group', 'run', 'run_id', 'seed')


def default_group_column(records: list[dict]) -> str | None:
  """The first of GROUP_COLUMNS that every record has, or None."""
  return next((c for c in GROUP_COLUMNS if all(c in r for r in records)), None)


def law_inputs(records: list[dict], inputs: Sequence[str], path: str,
               columns: dict[str, str] | None = None) -> dict[str, np.ndarray]:
  """Input name -> its column (`columns` renames, e.g. {'n_latents': 'Model Size'})."""
  columns = columns or {}
  return {name: column(records, columns.get(name, name), path) for name in inputs}
