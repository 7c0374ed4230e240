"""Where log records go: the console is for a person, the log file for the record.

Library code logs with `logging` as usual: `logging.getLogger(__name__)` for
details, and `stage(...)` for the few lines a person running a command wants to
see (what is starting, where its output goes). `setup` (called by the entry
points in `dictlearn.cli`) routes them:

    console   stage lines, dictlearn's warnings, anyone's errors but orbax's (and, with
              verbose=True, every INFO record with its logger and time)
    log file  every INFO record (ours, absl's, orbax's, JAX's), with times

so that a run prints one line per stage and its progress bar, and the details
are still there afterwards in `<workdir>/log.txt`. In a multi-process run,
process 0 does that; process p > 0 logs to `<workdir>/log.<p>.txt` and shows
only warnings and errors, each marked with its process.
"""
import logging
import os
import sys
import traceback
from typing import Optional

STAGE_LOGGER = 'dictlearn.stage'
LOG_FILE = 'log.txt'
_FILE_FORMAT = '%(asctime)s %(levelname).1s %(name)s: %(message)s'
_HANDLER_MARK = '_dictlearn_handler'


def stage(message: str, *args) -> None:
  """A line for the console: what a command is doing now (logged at INFO)."""
  logging.getLogger(STAGE_LOGGER).info(message, *args)


def exception_chain(error: Optional[BaseException]) -> list[BaseException]:
  """`error` and the exceptions it wraps (each one's `__cause__`, else its
  `__context__`), outermost first, each once."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _from_orbax(record: logging.LogRecord) -> bool:
  """Whether an error record comes from orbax: logged by orbax's code, or asyncio's
  'exception was never retrieved' for one of orbax's tasks or futures. A task's message
  names its coroutine's file; a future's (asyncio.gather's) names only the exception,
  so the exception's traceback is searched too."""
  orbax = f'{os.sep}orbax{os.sep}'
  if orbax in (record.pathname or ''):
    return True
  if record.name != 'asyncio':
    return False
  if orbax in record.getMessage():
    return True
  return any(orbax in frame.filename
             for error in exception_chain(record.exc_info[1] if record.exc_info else None)
             for frame in traceback.extract_tb(error.__traceback__))


class _ConsoleFilter(logging.Filter):
  """Stage lines, dictlearn's warnings (and the root logger's) and everyone's errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
      # orbax logs what fails in its threads (a full disk: dozens of records, and
      # asyncio's 'Task exception was never retrieved' for its tasks), then raises it to
      # dictlearn, which reports it once: these records stay in the log file.
      return not _from_orbax(record)
    if record.name == STAGE_LOGGER:
      return record.levelno >= logging.INFO
    return record.levelno >= logging.WARNING and (record.name == 'root'
                                                  or record.name.startswith('dictlearn'))


class _SecondaryConsoleFilter(logging.Filter):
  """A process other than 0: its warnings and errors only (process 0 tells the story)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or (
        record.levelno >= logging.WARNING and (record.name == 'root'
                                               or record.name.startswith('dictlearn')))


class _ConsoleFormatter(logging.Formatter):

  def __init__(self, process: int = 0):
    super().__init__()
    self._mark = f'process {process}: ' if process else ''

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.name == STAGE_LOGGER and record.levelno < logging.WARNING:
      return message
    return f'{self._mark}{record.levelname.lower()}: {message}'


def log_file_name(process: int = 0) -> str:
  """log.txt for process 0, log.<p>.txt for process p."""
  return LOG_FILE if not process else f'log.{process}.txt'


class _LogFileHandler(logging.FileHandler):
  """The log file; when it cannot be written (a full disk) it says so once on the
  console and stops, instead of printing a traceback for every record."""

  def handleError(self, record: logging.LogRecord) -> None:
    if getattr(self, '_failed', False):
      return
    self._failed = True  # pylint: disable=attribute-defined-outside-init
    error = sys.exc_info()[1]
    print(f'warning: cannot write the log file {self.baseFilename} ({error}); '
          'continuing without it', file=sys.stderr)

  def emit(self, record: logging.LogRecord) -> None:
    if not getattr(self, '_failed', False):
      super().emit(record)


def _remove_our_handlers(root: logging.Logger) -> None:
  for handler in list(root.handlers):
    if getattr(handler, _HANDLER_MARK, False):
      root.removeHandler(handler)
      handler.close()


def setup(log_dir: Optional[str] = None, *, verbose: bool = False,
          process: int = 0) -> Optional[str]:
  """Routes log records to the console and to `log_dir/log.txt` (appended).

  Calling it again (a second command in one process, a test) replaces what the
  previous call installed.

  Args:
    log_dir: directory of the log file; None (or a URL such as gs://...) for no file.
    verbose: show every INFO record on the console, as the log file has it.
    process: this process's index in a multi-process run; process p > 0 writes
      `log.<p>.txt` and shows only its warnings and errors.

  Returns:
    The log file's path, or None.
  """
  root = logging.getLogger()
  _remove_our_handlers(root)
  # absl's handler (installed by absl.app or absl.logging), and the plain stderr
  # handler that `logging.basicConfig` adds when a record is logged through the
  # root logger before this runs, would print every record again: the handlers
  # below replace them. (Other handlers, such as pytest's capture, stay.)
  for handler in list(root.handlers):
    if type(handler).__name__ == 'ABSLHandler' or type(handler) is logging.StreamHandler:
      root.removeHandler(handler)
  root.setLevel(logging.INFO)

  console = logging.StreamHandler(sys.stderr)
  if verbose:
    console.setFormatter(logging.Formatter(_FILE_FORMAT))
  else:
    console.addFilter(_SecondaryConsoleFilter() if process else _ConsoleFilter())
    console.setFormatter(_ConsoleFormatter(process))
  setattr(console, _HANDLER_MARK, True)
  root.addHandler(console)

  path = None
  if log_dir and '://' not in log_dir:
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
      raise NotADirectoryError(f'{log_dir} is a file; expected a directory (for the '
                               'command\'s output and its log.txt)')
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, log_file_name(process))
    file_handler = _LogFileHandler(path, encoding='utf-8')
    file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    setattr(file_handler, _HANDLER_MARK, True)
    root.addHandler(file_handler)
  return path
