"""Harvest throughput of dictlearn against transformers on the same GGUF model.

    .venv/bin/python tools/bench_harvest.py [--batch 8] [--context 256] [--batches 4] [--rounds 3]

dictlearn: `harvest()` over the built-in corpus (packing, tokenizing, forward, store
writes and the final flush; the loop's own time from the summary, compile excluded
by a warm-up harvest), once reading a deep site (`--deep_site`, stopping after its
block) and once at full depth (`blocks.{n-1}.hook_resid_post`, all blocks). Each
timed harvest's token budget is the row count of exactly `--batches` full batches of
contexts, so that it runs that many forwards and no partly used one. Two figures:
rows/s (the summary's tokens_per_s: store rows, BOS positions left out) and
tokens/s forwarded (batches x batch x context over the same seconds), the unit
transformers is timed in; the ratios use the second, since both sides then process
the same contexts, and a harvester built on transformers would drop the same BOS
rows. transformers: the peers venv (`.peers/bin/python`: torch + transformers +
gguf) loads the GGUF that `dictlearn.fetch` cached, as
/work/shared/bench/peers/hf_forward.py does, and times the base model's forward
with `output_hidden_states=True` (no lm_head: a harvester needs no logits) at the
same batch x context and dtype (`--dtype`); it also times the base model cut to the
deep site's depth, the fairest peer of dictlearn's early stop. The two run
alternately, `--rounds` times, and the ratios are per round (the machine may be
shared) with their median.
Prints figures; it is not a test.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from dictlearn import cli
from dictlearn import fetch
from dictlearn import harvest as harvest_lib
from dictlearn.data import corpus as corpus_lib
from dictlearn.lm import gguf
harvest_smollm2 = cli.experiment('harvest_smollm2')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = os.path.join(REPO, '.peers', 'bin', 'python')

# Runs in the peers venv: argv = batch, context, deep layer, repeats, GGUF file, dtype.
# Prints one JSON line.
HF_SCRIPT = r'''
import json, os, sys, time
import pydoc_data.topics as tp
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
B, T, deep, repeats = (int(a) for a in sys.argv[1:5])
d, f = os.path.split(sys.argv[5])
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
dtype = getattr(torch, sys.argv[6])
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=dtype).eval()
text = "".join(tp.topics[k] for k in sorted(tp.topics))
ids = tok(text, return_tensors="pt").input_ids[:, :B * T].reshape(B, T)
base = model.model
def rate():
    base(ids, output_hidden_states=True)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            out = base(ids, output_hidden_states=True)
        times.append(time.perf_counter() - t)
    assert len(out.hidden_states) == len(base.layers) + 1
    return B * T / sorted(times)[len(times) // 2]
with torch.no_grad():
    full = rate()
    base.layers = base.layers[:deep + 1]  # stop after the deep site's block
    cut = rate()
print(json.dumps({"full": full, "deep": cut, "threads": torch.get_num_threads(),
                  "torch": torch.__version__}))
'''


def _config(args, site, budget):
  config = harvest_smollm2.get_config()
  with config.unlocked():
    config.update(sites=(site,), context_length=args.context, batch_size=args.batch,
                  corpus='builtin', progress=False, dtype=args.dtype, token_budget=budget)
  return config


def whole_batch_budget(model, args, n_batches):
  """Store rows of the first `n_batches` full batches of packed contexts.

  A harvest with this token budget forwards exactly `n_batches` batches.

  Raises:
    SystemExit: the built-in corpus holds fewer contexts than that.
  """
  tokenizer = model[2]
  config = _config(args, args.deep_site, -1)  # the corpus and packing each harvest uses
  corpus = corpus_lib.Corpus(config.corpus, jsonl_field=config.jsonl_field)
  contexts = corpus_lib.pack_contexts(corpus, tokenizer.encode_batch, tokenizer.bos_id,
                                      config.context_length)
  rows, n = 0, 0
  for context in contexts:
    if context.length < config.context_length:
      break  # the corpus's last, partly filled context
    rows += int(context.row_mask(config.exclude_bos).sum())
    n += 1
    if n == n_batches * args.batch:
      return rows
  raise SystemExit(f'--batches {n_batches} x --batch {args.batch} needs {n_batches * args.batch} '
                   f'full contexts of {args.context} tokens; the built-in corpus has {n}')


def run_dictlearn(model, site, args, workdir, budgets):
  """(rows/s, tokens forwarded/s) of the harvest loop reading `site`.

  A warm-up harvest of one batch compiles first; the medians are over `--repeats`.
  """
  rows, forwarded = [], []
  for i in range(1 + args.repeats):
    n_batches = 1 if i == 0 else args.batches
    config = _config(args, site, budgets[n_batches])
    summary = harvest_lib.harvest(config, tempfile.mkdtemp(dir=workdir), model=model)
    if summary['n_tokens'] != budgets[n_batches]:
      raise RuntimeError(f'harvest wrote {summary["n_tokens"]} rows, expected {budgets[n_batches]}')
    if i:
      rows.append(summary['tokens_per_s'])
      forwarded.append(n_batches * args.batch * args.context / summary['seconds'])
  return statistics.median(rows), statistics.median(forwarded)


def run_transformers(args, deep_layer):
  """{'full': tok/s, 'deep': tok/s, ...} from the peers venv, or None."""
  with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
    f.write(HF_SCRIPT)
  try:
    proc = subprocess.run([PEERS_PYTHON, f.name, str(args.batch), str(args.context),
                           str(deep_layer), str(args.repeats), fetch.default_gguf_path(), args.dtype],
                          capture_output=True, text=True, check=False)
  finally:
    os.unlink(f.name)
  if proc.returncode:
    print(f'transformers failed (rc {proc.returncode}): {proc.stderr[-2000:]}')
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8, help='contexts per forward')
  parser.add_argument('--context', type=int, default=256, help='tokens per context')
  parser.add_argument('--batches', type=int, default=4, help='forward batches per timed harvest')
  parser.add_argument('--repeats', type=int, default=1, help='timed runs per case per round')
  parser.add_argument('--rounds', type=int, default=3, help='alternations with transformers')
  parser.add_argument('--deep_site', default='blocks.24.hook_resid_post')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--no_peers', action='store_true', help='skip transformers')
  args = parser.parse_args()

  t = time.perf_counter()
  model = gguf.load_gguf(dtype={'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[args.dtype])
  cfg = model[0]
  deep_layer = int(args.deep_site.split('.')[1])
  full_site = f'blocks.{cfg.n_layers - 1}.hook_resid_post'
  print(f'loaded {cfg.name} in {time.perf_counter() - t:.1f}s; jax {jax.__version__} on '
        f'{jax.devices()[0].platform}, {os.cpu_count()} cpus; B={args.batch} x T={args.context}, '
        f'{args.batches} batches per timed harvest, {args.dtype}')
  peers = os.path.exists(PEERS_PYTHON) and not args.no_peers
  cases = {'deep': args.deep_site, 'full': full_site}
  budgets = {n: whole_batch_budget(model, args, n) for n in (1, args.batches)}
  print(f'each timed harvest: {args.batches} forwards of {args.batch} x {args.context} tokens, '
        f'{budgets[args.batches]} store rows (BOS positions left out)')
  ours, rows, theirs = [], [], []
  with tempfile.TemporaryDirectory() as workdir:
    for r in range(args.rounds if peers else 1):
      figures = {name: run_dictlearn(model, site, args, workdir, budgets)
                 for name, site in cases.items()}
      rows.append({name: f[0] for name, f in figures.items()})
      ours.append({name: f[1] for name, f in figures.items()})
      for name, site in cases.items():
        print(f'[round {r}, load {os.getloadavg()[0]:.1f}] dictlearn harvest {site}: '
              f'{figures[name][1]:.0f} tok/s forwarded, {figures[name][0]:.0f} rows/s')
      if peers:
        hf = run_transformers(args, deep_layer)
        if hf:
          theirs.append(hf)
          print(f'[round {r}, load {os.getloadavg()[0]:.1f}] transformers forward '
                f'({args.dtype}, output_hidden_states, torch {hf["torch"]}, {hf["threads"]} threads): '
                f'full {hf["full"]:.0f} tok/s, cut after block {deep_layer} {hf["deep"]:.0f} tok/s')
  print('--- medians over rounds ---')
  for name, site in cases.items():
    print(f'dictlearn harvest {site}: {statistics.median(f[name] for f in ours):.0f} tok/s '
          f'forwarded, {statistics.median(f[name] for f in rows):.0f} rows/s')
  if not theirs:
    print('(transformers skipped: --no_peers)' if args.no_peers else
          f'(no transformers reference: {PEERS_PYTHON} missing or failed)')
    return
  print(f'transformers full forward: {statistics.median(h["full"] for h in theirs):.0f} tok/s; '
        f'cut after block {deep_layer}: {statistics.median(h["deep"] for h in theirs):.0f} tok/s')
  comparisons = [
      (f'dictlearn {args.deep_site} (stops after block {deep_layer}) / transformers full',
       'deep', 'full'),
      (f'dictlearn {args.deep_site} / transformers cut after block {deep_layer}', 'deep', 'deep'),
      ('dictlearn full depth / transformers full', 'full', 'full'),
  ]
  for label, ours_key, theirs_key in comparisons:
    per_round = [o[ours_key] / h[theirs_key] for o, h in zip(ours, theirs)]
    print(f'{label}: {statistics.median(per_round):.2f}x (per round '
          f'{", ".join(f"{x:.2f}" for x in per_round)})')


if __name__ == '__main__':
  cli.run_main(main)
