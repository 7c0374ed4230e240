"""Around the scaling fitter: result tables and --where, the hold-out tool, the plots."""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dictlearn import scaling
from dictlearn.scaling import __main__ as cli
from dictlearn.scaling import laws, plot
from dictlearn.scaling import records as records_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
POWER_TRUE = np.array([math.log(2.0), 0.4, math.log(0.02)])


# ---- --where -------------------------------------------------------------------------


def test_where_conditions():
  records = [{'n_latents': 2 ** i, 'k': 32 if i % 2 else 64, 'run': f'r{i}', 'Model Size': '1e8'}
             for i in range(8, 16)]
  pick = lambda *conds: [r['n_latents'] for r in records_lib.select(records, conds, 'R')]
  assert pick('n_latents<=1024') == [256, 512, 1024]
  assert pick('n_latents > 4096', 'k == 32') == [8192, 32768]
  assert pick('run!=r8', 'n_latents<1024') == [512]
  assert pick("run='r9'") == [512]
  assert len(pick('Model Size>=1e8')) == 8  # a CSV column name with a space
  assert len(pick()) == 8
  for cond, message in (('n_latents', 'expected FIELD OP VALUE'),
                        ('run<r9', 'needs a number'),
                        ('seed==1', r"names no column; columns present: \['Model Size', 'k'"),
                        ('run>3', "record 1, 'run' is 'r8', not a number"),
                        ('n_latents>1e9', 'no record of 8 passes')):
    with pytest.raises(ValueError, match=message):
      pick(cond)


def _power_jsonl(path, sizes, rng, extra=()):
  n = np.repeat(sizes, 2)
  y = laws.predict(laws.POWER, POWER_TRUE, {'n_latents': n}) * np.exp(0.01 * rng.standard_normal(n.size))
  with open(path, 'w') as f:
    for i, (size, v) in enumerate(zip(n, y)):
      f.write(json.dumps({'run': f'n{size:.0f}_s{i % 2}', 'n_latents': size, 'fvu': v}) + '\n')
    for record in extra:
      f.write(json.dumps(record) + '\n')


def test_cli_fits_the_subset_where_asks(tmp_path, capsys):
  path, out = tmp_path / 'results.jsonl', tmp_path / 'fit.json'
  # Two runs per size up to 32768, and a broken run at 2^20 that only --where keeps out.
  _power_jsonl(path, 2.0 ** np.arange(8, 16), np.random.default_rng(0),
               extra=[{'run': 'big', 'n_latents': 2 ** 20, 'fvu': 5.0}])
  args = ['fit', str(path), '--form', 'power', '--target', 'fvu', '--n-boot', '0',
          '--n-starts', '16', '--where', 'n_latents<=32768', '--out', str(out), '--targets', '1e6']
  assert cli.main(args) == 0
  printed = capsys.readouterr().out
  assert '16 jsonl records (of 17, where n_latents<=32768)' in printed
  assert "Scaling law 'power' for fvu" in printed
  result = json.loads(out.read_text())
  assert result['n_points'] == 16 and result['input']['where'] == ['n_latents<=32768']
  assert result['estimate']['alpha'] == pytest.approx(0.4, abs=0.05)
  assert result['settings']['delta'] is None and result['settings']['delta_used'] > 0
  assert cli.main(args[:-4] + ['--where', 'n_latent<=5']) == 1
  assert "names no column; columns present: ['fvu', 'n_latents', 'run']" in capsys.readouterr().err
  with pytest.raises(SystemExit) as usage:  # a malformed condition is a bad flag
    cli.main(args[:-4] + ['--where', 'run<r8'])
  assert usage.value.code == 2 and 'needs a number' in capsys.readouterr().err


# ---- the hold-out tool ---------------------------------------------------------------


def test_holdout_tool_takes_any_form_and_the_k_largest_sizes(tmp_path):
  rng = np.random.default_rng(1)
  n, k = np.meshgrid(2.0 ** np.arange(10, 16), [16.0, 32.0, 64.0])
  x = {'n_latents': n.ravel(), 'k': k.ravel()}
  truth = np.array([1.0, -0.3, -0.25, 0.01, -2.5, -0.3])
  y = laws.predict(laws.OPENAI, truth, x) * np.exp(0.01 * rng.standard_normal(n.size))
  path = tmp_path / 'results.jsonl'
  with open(path, 'w') as f:
    for i, (size, kk, v) in enumerate(zip(x['n_latents'], x['k'], y)):
      f.write(json.dumps({'run': f'n{size:.0f}_k{kk:.0f}', 'n_latents': size, 'k': kk,
                          'mse': v, 'd_model': 64}) + '\n')
  # Run as a user runs it: from elsewhere, importing dictlearn from PYTHONPATH.
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, str(REPO / 'tools' / 'scaling_holdout.py'), str(path), '--form', 'openai',
       '--target', 'mse', '--holdout-largest', '2', '--where', 'k>=32', '--n-boot', '20',
       '--n-starts', '16'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "fitted on 8 points with n_latents < 16384:" in out
  assert "Scaling law 'openai' for mse" in out
  assert 'prediction of the held-out n_latents in [16384, 32768] (mse):' in out
  rows = [line for line in out.splitlines() if line.rstrip().endswith(('inside', 'outside'))]
  assert len(rows) == 4  # 2 sizes x k in (32, 64)
  errors = [float(line.split('%')[0].split()[-1]) for line in rows]
  assert max(abs(e) for e in errors) < 5  # percent; the noise is 1%
  bad = subprocess.run([sys.executable, str(REPO / 'tools' / 'scaling_holdout.py'), str(path),
                        '--form', 'openai', '--target', 'mse', '--holdout-largest', '6'],
                       cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and 'needs 1 <= k < the number of distinct sizes (6' in bad.stderr


# ---- plots -----------------------------------------------------------------------------


def _visible_labels(axis, lo, hi):
  """Window extents of the drawn tick labels inside (lo, hi), bottom to top."""
  ticks = [(t, loc) for t, loc in zip(axis.get_major_ticks(), axis.get_majorticklocs())]
  ticks += [(t, loc) for t, loc in zip(axis.get_minor_ticks(), axis.get_minorticklocs())]
  boxes = [t.label1.get_window_extent() for t, loc in ticks
           if lo <= loc <= hi and t.label1.get_visible() and t.label1.get_text()]
  return sorted(boxes, key=lambda b: b.y0)


def test_plots_name_the_target_and_their_labels_do_not_overlap():
  rng = np.random.default_rng(2)
  n = np.repeat(2.0 ** np.arange(8, 14), 2)
  truth = np.array([math.log(2.0), 0.4, math.log(1e-4)])  # FVU falls two decades by 34M latents
  y = laws.predict(laws.POWER, truth, {'n_latents': n}) * np.exp(0.01 * rng.standard_normal(n.size))
  result = scaling.fit_law('power', {'n_latents': n}, y, target='fvu',
                           options=scaling.FitOptions(n_boot=10, n_starts=8))
  figures = plot.figures(result)
  try:
    assert sorted(figures) == ['extrapolation.png', 'loss_vs_size.png', 'residuals.png']
    assert figures['residuals.png'].axes[0].get_xlabel() == 'predicted fvu'
    for name, span in (('extrapolation.png', 1.5), ('loss_vs_size.png', 0.0)):
      ax = figures[name].axes[0]
      assert ax.get_ylabel() == 'fvu'
      figures[name].canvas.draw()
      lo, hi = ax.get_ylim()
      assert math.log10(hi / lo) > span  # the extrapolation spans decades, the data less than one
      boxes = _visible_labels(ax.yaxis, lo, hi)
      assert len(boxes) >= 2, name
      assert all(a.y1 <= b.y0 for a, b in zip(boxes, boxes[1:])), name
      assert all(t.get_text().replace('.', '').isdigit()
                 for t in ax.get_yticklabels() if t.get_text())  # 0.02, not 2 x 10^-2
  finally:
    for fig in figures.values():
      plot.plt.close(fig)
