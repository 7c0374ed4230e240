"""Forward throughput of the JAX SmolLM2 port, against transformers when available.

    .venv/bin/python tools/bench_lm.py [--batch 8] [--seq 256] [--rounds 3]

Times (tokens/s, batch x seq tokens per call) the full forward with logits,
a read of `blocks.12.hook_resid_post` stopping after block 12, and a read of
a deep site (`blocks.24.hook_resid_post`). When `.peers/bin/python` exists
(PyTorch + transformers, see /work/shared/bench/peers/README.md), runs
`hf_forward.py BATCH SEQ` as a subprocess alternately with dictlearn, `--rounds`
times, and prints the ratio of medians. Prints figures; it is not a test.
"""
import os
import re
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pydoc_data.topics

from dictlearn import cli
from dictlearn.lm import generate, gguf, llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = os.path.join(REPO, '.peers', 'bin', 'python')
HF_SCRIPT = '/work/shared/bench/peers/hf_forward.py'


def _time_call(fn, repeats):
  """Median seconds of `repeats` calls after one warm-up (compile) call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def run_dictlearn(cfg, params, tokens, repeats):
  """{case: tokens/s} for the three forward variants."""
  n = tokens.size
  cases = {
      'full forward + logits': lambda: llama.forward(params, cfg, tokens)[0],
      'read blocks.12.hook_resid_post (stop after 12)': lambda: llama.forward(
          params, cfg, tokens, read_sites=('blocks.12.hook_resid_post',),
          return_logits=False)[1],
      'read blocks.24.hook_resid_post (stop after 24)': lambda: llama.forward(
          params, cfg, tokens, read_sites=('blocks.24.hook_resid_post',),
          return_logits=False)[1],
  }
  return {name: n / _time_call(fn, repeats) for name, fn in cases.items()}


def run_transformers(batch, seq):
  """(tokens/s, perplexity, line) from hf_forward.py, or None when it fails."""
  proc = subprocess.run([PEERS_PYTHON, HF_SCRIPT, str(batch), str(seq)], capture_output=True,
                        text=True, check=False)
  rate = re.search(r'transformers forward: (\d+) tok/s.*', proc.stdout)
  ppl = re.search(r'ppl ([\d.]+)', proc.stdout)
  if proc.returncode or not rate:
    print(f'transformers reference failed (rc {proc.returncode}): {proc.stderr[-2000:]}')
    return None
  return float(rate.group(1)), float(ppl.group(1)) if ppl else float('nan'), rate.group(0)


def main():
  parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=256)
  parser.add_argument('--rounds', type=int, default=3, help='alternations with transformers')
  parser.add_argument('--repeats', type=int, default=2, help='timed calls per case per round')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--no-peers', action='store_true', help='skip transformers')
  args = parser.parse_args()

  t = time.perf_counter()
  cfg, params, tok = gguf.load_gguf(dtype=jnp.dtype(args.dtype))
  print(f'loaded {cfg.name} ({args.dtype}) in {time.perf_counter() - t:.1f}s; '
        f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus')
  text = pydoc_data.topics.topics['assert'] + pydoc_data.topics.topics['if']
  ids = tok.encode(text)[:256]
  print(f'perplexity (first 256 tokens of pydoc assert+if): '
        f'{llama.perplexity(params, cfg, jnp.asarray([ids])):.3f}')
  reps = -(-args.seq // len(ids))
  tokens = jnp.asarray(np.tile(np.asarray((ids * reps)[:args.seq], np.int32), (args.batch, 1)))

  peers = os.path.exists(PEERS_PYTHON) and not args.no_peers
  ours, theirs, ratios = [], [], []
  for r in range(args.rounds if peers else 1):
    load = os.getloadavg()[0]
    figures = run_dictlearn(cfg, params, tokens, args.repeats)
    ours.append(figures)
    for name, rate in figures.items():
      print(f'[round {r}, load {load:.1f}] dictlearn {name}: {rate:.0f} tok/s '
            f'(B={args.batch}, T={args.seq})')
    if peers:
      hf = run_transformers(args.batch, args.seq)
      if hf:
        theirs.append(hf[0])
        ratios.append({name: rate / hf[0] for name, rate in figures.items()})
        print(f'[round {r}, load {os.getloadavg()[0]:.1f}] {hf[2]}; transformers ppl {hf[1]:.3f}')
  # The machine may be shared: the ratio of figures taken side by side in one round is
  # steadier than either figure alone, so report the median of the per-round ratios.
  print('--- medians over rounds ---')
  for name in ours[0]:
    line = f'dictlearn {name}: {statistics.median(f[name] for f in ours):.0f} tok/s'
    if ratios:
      line += f'  ({statistics.median(x[name] for x in ratios):.2f}x transformers, per-round ' + (
          ', '.join(f'{x[name]:.2f}' for x in ratios)) + ')'
    print(line)
  if theirs:
    print(f'transformers full forward: {statistics.median(theirs):.0f} tok/s')
  elif not peers:
    print(f'(no transformers reference: {PEERS_PYTHON} not found)')

  # Decoding with the KV cache (no reference: hf_forward.py times the forward only).
  prompts = [ids[:16 + 4 * i] for i in range(args.batch)]
  new = 64
  run = lambda: generate.generate(params, cfg, prompts, max_new_tokens=new, eos_id=None)
  run()
  t = time.perf_counter()
  run()
  dt = time.perf_counter() - t
  print(f'dictlearn greedy generate (KV cache, B={args.batch}, prompts 16..{16 + 4 * (args.batch - 1)} '
        f'tokens, {new} new): {args.batch * new / dt:.0f} new tok/s, {1e3 * dt / new:.0f} ms/step')


if __name__ == '__main__':
  cli.run_main(main)
