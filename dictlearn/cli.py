"""Entry points: one way to parse flags, keep the console quiet, and fail on one line.

Two kinds of command, one style each:

* config-driven (`dictlearn.train`, `.harvest`, `.pipeline`, `.scaling.sweep`): absl
  flags with an ml_collections config file, `--config FILE[:ARG]` and overrides
  `--config.a.b=v`; the module defines its flags and ends with
  `cli.run_config_command(main, doc=__doc__, log_dir=...)`.
* small commands (`dictlearn.evals`, `.scaling`, `.fetch`, `tools/*`): argparse, through
  `cli.ArgumentParser` and `cli.run_tool(main)` (or, for a tool whose `main()` parses
  its own flags and sets up its own logging, the benchmarks, `cli.run_main(main)`).

Both behave the same way for a person at a terminal:

* the console shows one line per stage, the progress bar and warnings; every
  detail goes to `log.txt` in the run's directory (`dictlearn.logs`);
* a bad flag is `error: ...` on one line and exit status 2;
* an exception is `error: ...` on one line and exit status 1; the traceback goes
  to the log file (and to the console with `--verbose`);
* Ctrl-C is `interrupted` and exit status 130.
"""
import argparse
import importlib
import logging
import os
import runpy
import sys
import traceback
from typing import Callable, Optional, Sequence

from absl import flags
from ml_collections import config_flags

from dictlearn import distributed
from dictlearn import host_memory
from dictlearn import logs

log = logging.getLogger(__name__)

_VERBOSE = flags.DEFINE_bool('verbose', False, 'show every log record and tracebacks on the '
                             'console (they always go to the log file)')

# Exceptions whose message is the whole story for the user: a bad input, a
# missing file, a full disk, a diverged run. Anything else is reported as an
# internal error, with its type, and the traceback kept in the log. An exception
# class may also declare itself a user error with `user_error = True`.
USER_ERRORS = (ValueError, OSError, FloatingPointError, LookupError)

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'experiments')


class UsageError(Exception):
  """A command line that cannot be run as given (exit status 2)."""


# ---------------------------------------------------------------------------
# Failing on one line
# ---------------------------------------------------------------------------

def is_user_error(error: BaseException) -> bool:
  """Whether the message alone explains `error` (USER_ERRORS, or a class that says
  so with `user_error = True`)."""
  return isinstance(error, USER_ERRORS) or getattr(error, 'user_error', False)


def describe(error: BaseException) -> str:
  """The one-line message for an exception."""
  message = str(error).strip() or type(error).__name__
  if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in message:
    message = f'{message}: {error.filename}'
  if not is_user_error(error):
    message = f'internal error ({type(error).__name__}: {message})'
  return ' '.join(message.split('\n')[0].split()) if '\n' in message else message


def _report(error: BaseException, log_path: Optional[str], verbose: bool) -> None:
  details = ''.join(traceback.format_exception(error))
  log.info('the command failed:\n%s', details)  # to the log file (console too with --verbose)
  where = f' (traceback in {log_path})' if log_path and not is_user_error(error) else ''
  if verbose and not log_path:
    print(details, file=sys.stderr, end='')
  print(f'error: {describe(error)}{where}', file=sys.stderr)


def _run(fn: Callable[[], Optional[int]], log_path: Optional[str], verbose: bool) -> int:
  try:
    status = fn()
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    _report(e, log_path, verbose)
    return 1
  return int(status or 0)


# ---------------------------------------------------------------------------
# Config-driven commands (absl + ml_collections)
# ---------------------------------------------------------------------------

def _config_value(argv: Sequence[str]) -> Optional[str]:
  value = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if value is None and '--config' in argv[:-1]:
    value = argv[list(argv).index('--config') + 1]
  return value


def make_config_importable(config_file: str) -> None:
  """Lets a config file import its neighbours (`from experiments import base`)
  whatever the current directory: the folder above its package goes on sys.path."""
  folder = os.path.dirname(os.path.abspath(config_file))
  if os.path.isfile(os.path.join(folder, '__init__.py')):
    root = os.path.dirname(folder)
    if root not in sys.path:
      sys.path.insert(0, root)


def experiment(name: str):
  """The module `experiments/<name>.py` of this checkout, for tools run as
  `python tools/x.py` (where the checkout's root is not on sys.path)."""
  make_config_importable(os.path.join(EXPERIMENTS_DIR, f'{name}.py'))
  return importlib.import_module(f'experiments.{name}')


def load_config_file(spec: str):
  """`get_config(arg)` of `FILE[:ARG]`, with errors that name the file.

  Raises:
    UsageError: no such file, no get_config, or the file failed to load.
  """
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UsageError(f'--config {path}: no such config file (the experiments are in '
                     f'{EXPERIMENTS_DIR})')
  make_config_importable(path)
  try:
    module = runpy.run_path(path)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f'--config {path}: the file failed to load: {type(e).__name__}: {e}') from e
  if 'get_config' not in module:
    raise UsageError(f'--config {path}: defines no get_config(arg) function')
  return module['get_config'](arg or None)


def unknown_override(argv: Sequence[str]) -> Optional[str]:
  """Names the first `--config.a.b=v` whose field the config file does not have."""
  spec = _config_value(argv)
  if spec is None:
    return None
  config = load_config_file(spec)
  for a in argv:
    if not a.startswith('--config.'):
      continue
    dotted = a[len('--config.'):].split('=', 1)[0]
    node, walked = config, []
    for part in dotted.split('.'):
      if not hasattr(node, 'keys') or part not in node.keys():
        where = '.'.join(['config'] + walked)
        valid = sorted(node.keys()) if hasattr(node, 'keys') else []
        return (f'{a}: {where} has no field {part!r} (config file {spec.partition(":")[0]}); '
                f'its fields are: {", ".join(valid)}')
      node = node[part]
      walked.append(part)
  return None


def experiments_help() -> str:
  """The shipped experiment files, each with the first line of its docstring."""
  if not os.path.isdir(EXPERIMENTS_DIR):
    return ''
  lines = []
  for name in sorted(os.listdir(EXPERIMENTS_DIR)):
    if not name.endswith('.py') or name.startswith('_'):
      continue
    with open(os.path.join(EXPERIMENTS_DIR, name), encoding='utf-8') as f:
      text = f.read()
    first = ''
    if text.lstrip().startswith('"""'):
      first = text.lstrip()[3:].strip().splitlines()[0].rstrip('."')
    lines.append(f'  {name:28s} {first}')
  return ('Experiments (' + EXPERIMENTS_DIR + '):\n' + '\n'.join(lines) + '\n\nEvery config '
          'field, with a one-line comment: experiments/base.py (trainer) and '
          'experiments/harvest_smollm2.py (harvest). Override one with --config.a.b=VALUE.')


def define_flags(directory: str, directory_help: str,
                 config_help: str = 'experiment config file[:arg]'):
  """The flags of a config-driven command: `--config` and its output directory.

  Returns:
    (config flag, directory flag) holders; both flags are required.
  """
  config = config_flags.DEFINE_config_file('config', None, config_help, lock_config=True)
  where = flags.DEFINE_string(directory, None, directory_help)
  flags.mark_flags_as_required(['config', directory])
  return config, where


def no_arguments(argv: Sequence[str]) -> None:
  """Raises UsageError when a command that takes only flags got positional arguments."""
  if len(argv) > 1:
    raise UsageError(f'unexpected arguments: {list(argv[1:])}')


def _help_text(doc: str) -> str:
  own = '\n'.join(flags.FLAGS.module_help(m).strip() for m in (__name__, sys.argv[0])
                  if flags.FLAGS.module_help(m).strip())
  return f'{doc.strip()}\n\nFlags:\n{own}\n\n' + experiments_help()


def parse_config_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing, with one clear line for every way a command line can be wrong.

  Raises:
    UsageError: an unknown flag, a missing required flag, a config file that does
      not exist or fails to load, an override naming no field.
  """
  spec = _config_value(argv)
  if spec is not None:
    load_config_file(spec)  # the file's own problems, named, before absl sees it
  try:
    return flags.FLAGS(list(argv))
  except (AttributeError, KeyError, flags.Error) as e:
    raise UsageError(unknown_override(argv) or str(e).split('\n')[0]) from None


def run_config_command(main: Callable[[list[str]], Optional[int]], *, doc: str,
                       log_dir: Callable[[], Optional[str]], argv=None) -> None:
  """Parses absl flags, sets up logging into `log_dir()`, runs `main(args)`, exits.

  Args:
    main: the command; gets the positional arguments (argv[0] first).
    doc: the usage text shown by --help (the module docstring).
    log_dir: called after parsing; the directory for log.txt (None for none).
    argv: the command line (default sys.argv).
  """
  host_memory.keep_freed_memory()  # before JAX starts its threads
  argv = list(sys.argv if argv is None else argv)
  if any(a in ('-h', '--help', '--helpfull', '-?') for a in argv[1:]):
    print(_help_text(doc))
    sys.exit(0)
  try:
    args = parse_config_flags(argv)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  verbose = _VERBOSE.value
  log_path = None
  try:
    process = start_processes()
    log_path = logs.setup(log_dir(), verbose=verbose, process=process)
  except (OSError, ValueError) as e:  # an unreachable coordinator; a workdir that is a file
    print(f'error: {describe(e)}', file=sys.stderr)
    sys.exit(1)
  sys.exit(_run(lambda: main(args), log_path, verbose))


def start_processes() -> int:
  """Joins a multi-process run when the parsed config's `distributed` section (or the
  environment) says so, before anything touches a device; returns this process's index."""
  config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
  if config is None or 'distributed' not in config:
    return 0
  if not distributed.initialize(config.distributed):
    return 0
  return distributed.process_index()


# ---------------------------------------------------------------------------
# Small commands (argparse)
# ---------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
  """argparse with `--verbose`, and a bad command line on one line (exit status 2)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)
    self.add_argument('--verbose', action='store_true',
                      help='show every log record and tracebacks on the console')

  def error(self, message):
    print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
    sys.exit(2)


def as_flags(args: argparse.Namespace, *, skip: Sequence[str] = ()) -> list[str]:
  """Parsed arguments back into a command line (for a tool that reruns itself in a
  child process): `--name=value`, a switch as `--name` when set, None left out."""
  out = []
  for name, value in vars(args).items():
    if name in skip or value is None or value is False:
      continue
    out.append(f'--{name}' if value is True else f'--{name}={value}')
  return out


def run_tool(main: Callable[[argparse.Namespace], Optional[int]], parser: ArgumentParser,
             argv=None, *, log_dir: Callable[[argparse.Namespace], Optional[str]] = None) -> int:
  """Parses `argv` with `parser`, sets up logging, runs `main(args)`; returns the status.

  Use as `sys.exit(cli.run_tool(main, parser))`.
  """
  host_memory.keep_freed_memory()  # before JAX starts its threads
  args = parser.parse_args(argv)
  log_path = None
  try:
    log_path = logs.setup(log_dir(args) if log_dir else None, verbose=args.verbose)
  except OSError as e:
    print(f'error: {describe(e)}', file=sys.stderr)
    return 1
  return _run(lambda: main(args), log_path, args.verbose)


def run_main(main: Callable[[], Optional[int]]) -> None:
  """Runs a tool whose `main()` parses its own command line (with `ArgumentParser`) and
  sets up its own logging: an exception is `error: ...` on one line (the traceback
  with --verbose), exit status 1; exits with main's status otherwise.

  Use as `cli.run_main(main)` under `if __name__ == '__main__':`.
  """
  host_memory.keep_freed_memory()
  sys.exit(_run(main, None, '--verbose' in sys.argv[1:]))
