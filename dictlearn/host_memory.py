"""Host memory: keep the memory XLA frees for the next step, rather than return it to the OS.

On the CPU, XLA allocates every temporary of a jitted step (the encoder's
tiles of pre-activations, the [n_latents, d_model] gradients, the optimizer's
intermediates: about 280 MB for a TopK SAE of 16384 latents at batch 4096)
through the C library's malloc and frees it when the step ends. glibc serves
allocations that large with mmap and gives them back with munmap, so each step
faults every page of its temporaries in again: about 71,000 page faults and a
sixth of the step's time on a 2-core VM (tools/bench_train.py, BUILD_NOTES.md).

`keep_freed_memory` tells glibc to serve every allocation from one heap and
never to trim it: the next step reuses the same pages. The process's resident
memory then stays at its peak (which a training run reaches at its first step
anyway). Call it first thing in a process, before JAX starts its threads;
elsewhere than glibc it does nothing.
"""
import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_done = False


def _libc():
  """The C library, or None where it cannot be loaded."""
  try:
    return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return None


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse (see the module docstring).

  Returns:
    True when the settings took effect (Linux with glibc), else False.
  """
  global _done
  if _done:
    return True
  if not sys.platform.startswith('linux'):
    return False
  mallopt = getattr(_libc(), 'mallopt', None)
  if mallopt is None:  # not glibc (musl has no mallopt)
    log.debug('no mallopt in the C library: freed memory goes back to the OS')
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  # One arena: threads' own arenas are capped at 64 MiB heaps that glibc
  # returns page by page (madvise) when they empty, so large temporaries made
  # on XLA's threads would still be faulted in again at every step.
  ok = (mallopt(_M_ARENA_MAX, 1) == 1
        # No mmap: every allocation from the heap, whose freed pages are reused.
        and mallopt(_M_MMAP_MAX, 0) == 1
        # Never shrink the heap (-1 disables trimming: man mallopt).
        and mallopt(_M_TRIM_THRESHOLD, -1) == 1)
  _done = ok
  log.debug('glibc malloc keeps freed memory: %s', ok)
  return ok


def release_freed_memory() -> bool:
  """Gives the heap's free pages back to the OS now (glibc's malloc_trim(0)).

  With `keep_freed_memory` the resident memory stays at the largest the
  process has needed so far, and holes left between live blocks can make it
  grow past that. A process that runs several jobs of different shapes one
  after the other (tools/bench_train.py builds a step for every architecture,
  then starts the peers' processes beside itself) calls this between them;
  the next step faults the pages it needs in again.

  Returns:
    True when glibc's malloc_trim ran, else False.
  """
  if not sys.platform.startswith('linux'):
    return False
  trim = getattr(_libc(), 'malloc_trim', None)
  if trim is None:
    return False
  trim.argtypes = [ctypes.c_size_t]
  trim(0)
  return True
