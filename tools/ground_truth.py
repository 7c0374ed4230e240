"""Ground truth: each architecture's recipe on the synthetic superposition data.

    python tools/ground_truth.py [--arch topk relu_l1 batchtopk jumprelu]
                                 [--seed 0] [--workdir DIR] [--set section.field=value ...]

Trains every architecture's recipe (`experiments/synthetic.py`, `RECIPES`) with
the full trainer on one device, as tests/test_ground_truth.py does, and prints
a Markdown table: recovered fraction (true directions matched by a decoder row
at cosine >= 0.9), held-out FVU, L0, dead fraction and wall time. `--set`
overrides a field of every recipe (for trying settings). Not a test.
"""
import os
import tempfile
import time

import jax

from dictlearn import cli
from dictlearn.scaling import sweep
synthetic = cli.experiment('synthetic')


def run_one(arch, seed, workdir, overrides):
  """(eval dict, steps, seconds) of one recipe trained in `workdir`."""
  from dictlearn.train.trainer import train_and_evaluate
  try:
    config = sweep.apply_overrides(synthetic.recipe_config(arch), overrides)
  except (KeyError, ValueError, TypeError) as e:
    raise cli.UsageError(f'--set: {e}') from e
  config = sweep.apply_overrides(config, {'mesh.shape': (1, 1), 'seed': seed})
  start = time.perf_counter()
  summary = train_and_evaluate(config, workdir)
  return summary['eval'], config.train.num_steps, time.perf_counter() - start


def main():
  parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', nargs='+', default=sorted(synthetic.RECIPES),
                      choices=sorted(synthetic.RECIPES))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='', help='keep the runs here (default: a temporary directory)')
  parser.add_argument('--set', dest='assignments', action='append', default=[],
                      metavar='section.field=value')
  args = parser.parse_args()
  try:
    overrides = sweep.parse_overrides(args.assignments)
  except ValueError as e:
    raise cli.UsageError(str(e)) from e
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; seed {args.seed}')
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for arch in args.arch:
      workdir = os.path.join(args.workdir or scratch, arch)
      evaluation, steps, seconds = run_one(arch, args.seed, workdir, overrides)
      rows.append((arch, steps, evaluation, seconds))
      print(f"{arch}: recovered {evaluation['recovered_fraction']:.3f} in {seconds:.0f} s",
            flush=True)
  print('\n| architecture | steps | recovered | FVU | L0 | dead fraction | seconds |')
  print('| --- | ---: | ---: | ---: | ---: | ---: | ---: |')
  for arch, steps, e, seconds in rows:
    print(f"| {arch} | {steps} | {e['recovered_fraction']:.3f} | {e['fvu']:.4f} | {e['l0']:.2f} "
          f"| {e['dead_fraction']:.3f} | {seconds:.0f} |")


if __name__ == '__main__':
  cli.run_main(main)
