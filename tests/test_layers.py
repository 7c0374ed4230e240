"""DESIGN.md's one-way dependencies, checked on the source: no module imports upward.

Every `import dictlearn...` / `from dictlearn... import` in the package, at module
level or inside a function, is read from the syntax tree. A module may import
its own part of the package and any part on a lower layer; an import of a part
on its own layer or above fails the test, naming the file and line (an import
hidden inside a function to dodge a cycle is such an import).
"""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'dictlearn')

# The layers, bottom up (DESIGN.md, "Dependencies point one way").
LAYERS = {
    # utilities every layer may use
    'cache': 0, 'files': 0, 'host_memory': 0, 'logs': 0, 'sharding': 0, 'distributed': 0,
    'cli': 1,  # command-line parsing and one-line errors (uses logs)
    'fetch': 2,  # the bundled model file (a command of its own)
    # the three foundations, which know nothing of each other or of training
    'data': 3, 'sae': 3, 'lm': 3,
    'train': 4,
    'harvest': 5,
    'evals': 6,
    # on top
    'scaling': 7, 'pipeline': 7, 'analysis': 7, 'interop': 7,
}


def _part(module: str) -> str:
  """dictlearn.a.b -> 'a' (the top-level part of the package)."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else ''


def _imports(path: str, module: str):
  """(line, imported dictlearn module) for every import of the package in a file."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('dictlearn.'):
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative import: resolve against the package
        base = package.split('.')[:len(package.split('.')) - node.level + 1]
        name = '.'.join(base + ([node.module] if node.module else []))
      else:
        name = node.module or ''
      if name == 'dictlearn':  # from dictlearn import x, y
        for alias in node.names:
          yield node.lineno, f'dictlearn.{alias.name}'
      elif name.startswith('dictlearn.'):
        yield node.lineno, name


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, '.')
        yield path, rel.removesuffix('.__init__')


def test_every_part_of_the_package_has_a_layer():
  parts = {_part(module) for _, module in _modules()} - {''}
  assert parts <= set(LAYERS), f'parts without a layer in this test: {parts - set(LAYERS)}'


@pytest.mark.parametrize('path,module', list(_modules()), ids=lambda v: str(v).split('dictlearn/')[-1])
def test_no_upward_import(path, module):
  own = _part(module)
  if not own:
    return  # dictlearn/__init__.py
  bad = []
  for line, imported in _imports(path, module):
    other = _part(imported)
    if other != own and LAYERS[other] >= LAYERS[own]:
      bad.append(f'{os.path.relpath(path, os.path.dirname(PACKAGE))}:{line} imports {imported} '
                 f'({other}, layer {LAYERS[other]}) from {own} (layer {LAYERS[own]})')
  assert not bad, '\n'.join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
  """The walk sees imports inside functions (the usual way to hide a cycle)."""
  path = tmp_path / 'x.py'
  path.write_text('def f():\n  from dictlearn.train import checkpoint\n  return checkpoint\n')
  assert list(_imports(str(path), 'dictlearn.sae.x')) == [(2, 'dictlearn.train')]
