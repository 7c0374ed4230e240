"""Where a training step's time goes: XLA's own profile of the step, per op.

    python tools/profile_step.py [--arch topk] [--shape 576x16384] [--batch 4096]
                                 [--k 32] [--steps 3] [--top 25] [--dtype float32]

Builds the same jitted train step as tools/bench_train.py (state `init`), runs
it a few times, then traces --steps more under the JAX profiler and reads the
trace back (`jax.profiler.ProfileData`). Each XLA op (a thunk of the compiled
step) gets its exclusive time per step (its own time less the ops nested in
it, such as a loop's body), the JAX primitive it came from (the op's
`op_name` metadata in the compiled HLO) and the shape it produces. Printed:

  * wall time per step, and on the CPU each XLA worker thread's busy time per
    step (two threads busy for the whole step = both cores used);
  * time by primitive (dot_general, scatter-add, gather, top_k, ...);
  * the --top ops.

A primitive's share says what the step would gain from making it cheaper;
the thread times say how much of the step ran on one core only. Not a test.
"""
import collections
import glob
import os
import re
import tempfile
import time

import jax

from dictlearn import cli
import bench_train


def op_origins(hlo_text: str) -> dict:
  """{XLA op name: (JAX primitive, result shape)} from a compiled module's text."""
  origins = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\([^()]*\)|\S+)', line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    primitive = op.group(1).rsplit('/', 1)[-1] if op else '(no metadata)'
    origins[m.group(1)] = (primitive, m.group(2))
  return origins


def exclusive_times(trace_dir: str):
  """({event name: exclusive ns}, {event name: count}, {thread: busy ns}) of a trace."""
  from jax.profiler import ProfileData
  path = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)[0]
  data = ProfileData.from_file(path)
  own, count, busy = collections.Counter(), collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      events = sorted(((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events),
                      key=lambda e: (e[0], -e[1]))
      stack = []
      for start, end, name in events:
        while stack and stack[-1][1] <= start:
          stack.pop()
        if stack:
          own[stack[-1][2]] -= end - start
        elif line.name.startswith('tf_XLAEigen'):
          busy[line.name] += end - start
        own[name] += end - start
        count[name] += 1
        stack.append((start, end, name))
  return own, count, busy


def main():
  parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='topk', choices=['topk', 'batchtopk', 'relu_l1',
                                                         'jumprelu'])
  parser.add_argument('--shape', default='576x16384', help='d_model x n_latents')
  parser.add_argument('--batch', type=int, default=4096)
  parser.add_argument('--k', type=int, default=32)
  parser.add_argument('--steps', type=int, default=3, help='steps traced')
  parser.add_argument('--top', type=int, default=25, help='ops listed')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  args = parser.parse_args()
  try:
    d, n = (int(v) for v in args.shape.split('x'))
  except ValueError:
    parser.error(f'--shape must be DxN (for instance 576x16384), got {args.shape!r}')
  if args.steps < 1:
    parser.error(f'--steps must be at least 1, got {args.steps}')
  run = bench_train.make_step_runner(args.arch, d, n, args.batch, args.k, 'init', args.dtype)
  origins = op_origins(run.step.lower(*run.inputs()).compile().as_text())
  wall, _ = run(3)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    run(args.steps)
    traced = (time.perf_counter() - start) / args.steps
    jax.profiler.stop_trace()
    own, count, busy = exclusive_times(trace_dir)

  steps = args.steps
  ops = {name: t for name, t in own.items() if name in origins}
  print(f'{args.arch} {d}x{n}, batch {args.batch}, k {args.k}, {args.dtype}: '
        f'{wall * 1e3:.1f} ms per step untraced, {traced * 1e3:.1f} ms traced; '
        f'XLA ops {sum(ops.values()) / steps / 1e6:.1f} ms per step in all')
  for thread, ns in sorted(busy.items()):
    print(f'  thread {thread}: busy {ns / steps / 1e6:.1f} ms per step')
  by_primitive = collections.Counter()
  for name, t in ops.items():
    by_primitive[origins[name][0]] += t
  print(f"\n{'primitive':32s} {'ms/step':>9s}")
  for primitive, t in by_primitive.most_common():  # every one: a small one is still news
    print(f'{primitive[:32]:32s} {t / steps / 1e6:9.3f}')
  print(f"\n{'XLA op':28s} {'primitive':22s} {'result':30s} {'ms/step':>8s} {'calls':>6s}")
  for name, t in collections.Counter(ops).most_common(args.top):
    primitive, shape = origins[name]
    print(f'{name[:28]:28s} {primitive[:22]:22s} {shape[:30]:30s} {t / steps / 1e6:8.2f} '
          f'{count[name] // steps:6d}')


if __name__ == '__main__':
  cli.run_main(main)
