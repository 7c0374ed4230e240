"""dictlearn's cache directory: the fetched model file and generated corpus text.

$DICTLEARN_CACHE when set, else ~/.cache/dictlearn. Everything in it can be
made again (`python -m dictlearn.fetch`, the corpus's generation).
"""
import os

DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'dictlearn')


def cache_dir() -> str:
  """$DICTLEARN_CACHE, else ~/.cache/dictlearn (expanded, not created)."""
  return os.path.expanduser(os.environ.get('DICTLEARN_CACHE') or DEFAULT_CACHE_DIR)
