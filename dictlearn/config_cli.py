"""Command-line config handling shared by the entry points (absl + ml_collections)."""
import runpy
import sys

from absl import flags


def unknown_override(argv: list[str]) -> str | None:
  """Names the first `--config.a.b=v` whose field the config file does not have."""
  config_path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_path is None and '--config' in argv[:-1]:
    config_path = argv[argv.index('--config') + 1]
  if config_path is None:
    return None
  path, _, arg = config_path.partition(':')
  config = runpy.run_path(path)['get_config'](arg or None)
  for a in argv:
    if not a.startswith('--config.'):
      continue
    dotted = a[len('--config.'):].split('=', 1)[0]
    node, walked = config, []
    for part in dotted.split('.'):
      if not hasattr(node, 'keys') or part not in node.keys():
        where = '.'.join(['config'] + walked)
        valid = sorted(node.keys()) if hasattr(node, 'keys') else []
        return (f'{a}: {where} has no field {part!r} (config file {path}); '
                f'its fields are: {", ".join(valid)}')
      node = node[part]
      walked.append(part)
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for a config override that names no field."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    message = unknown_override(argv) or str(e)
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)
