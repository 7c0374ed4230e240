"""File digests: the SHA-256 that model records, vector files and exports carry."""
import hashlib


def sha256(path: str, block_size: int = 1 << 22) -> str:
  """Hex SHA-256 of a file, read in blocks of `block_size` bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(block_size), b''):
      digest.update(block)
  return digest.hexdigest()
