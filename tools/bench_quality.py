"""Dictionaries as good as the peers'? dictlearn and sparsify on the same activations.

    python tools/bench_quality.py --run /work/runs/smollm2 --out DIR
        [--peers_python /work/peers-venv/bin/python] [--ce_contexts 16]

Takes the main job's run (its store RUN/activations/<site> and its training config
from RUN/sae) and trains, at the same dictionary size, k, tokens, batch and
learning-rate schedule (linear warmup, then linear decay to 0: the schedule
sparsify's Adam path builds with transformers' get_linear_schedule_with_warmup;
dictlearn's config says the same with decay_start_fraction = warmup / steps):

    dictlearn              dictlearn's trainer (its Adam, clipping, AuxK, data_scale)
    sparsify adam          sparsify's own Trainer (tools/sparsify_train.py, the peers'
                           python) with optimizer adam, the same lr and warmup, AuxK at
                           dictlearn's weight (1/32) and dead threshold
    sparsify defaults      sparsify's Trainer as it comes: signum + schedule-free at its
                           own learning rate, no AuxK (auxk_alpha 0)
    SAELens topk           SAELens's SAETrainer (tools/saelens_train.py) with its TopK
                           defaults, the same lr, warmup and linear decay to 0, and its
                           dead-feature window set to dictlearn's dead threshold

on the rows before the held-out ones (sparsify reads them raw from a .npy, in a
seeded shuffled order, one pass per epoch), then evaluates each with dictlearn's
evals on the same held-out rows (every held-out batch): FVU, L0, dead fraction,
CE loss recovered and KL with the SAE spliced into SmolLM2. sparsify's SAEs come
in through `dictlearn.interop.sparsify` (SAELens's through `.saelens`) with the
store attached. The main job's
own run (its default schedule) is evaluated beside them. Finished pieces in DIR
are kept, so a rerun only evaluates. Prints a markdown table and writes
DIR/quality.json.
"""
import json
import logging
import os
import subprocess
import sys

import ml_collections
import numpy as np

from dictlearn import cli
from dictlearn import evals
from dictlearn import harvest
from dictlearn import lm
from dictlearn.data import store as store_lib
from dictlearn.interop import saelens
from dictlearn.interop import sparsify
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train.trainer import train_and_evaluate

TOOLS = os.path.dirname(os.path.abspath(__file__))
AUXK_ALPHA = 1.0 / 32  # dictlearn's aux_k_coefficient; sparsify's default is 0


def main_job_config(run_config: dict, store: str) -> ml_collections.ConfigDict:
  """experiments/smollm2_topk.py reading `store`, checked against the finished run's config
  (a field the run has with another value is an error: the comparison would not be the
  main job's)."""
  c = cli.load_config_file(os.path.join(cli.EXPERIMENTS_DIR, 'smollm2_topk.py'))
  differ = [f'{section}.{k}: run {v!r}, experiment {c[section][k]!r}'
            for section in ('sae', 'optim', 'train') for k, v in run_config[section].items()
            if k in c[section] and k not in ('eval_batches',) and
            json.dumps(v) != json.dumps(c[section][k], default=list)]
  if differ:
    raise ValueError('the run was not trained with experiments/smollm2_topk.py: ' + '; '.join(differ))
  c.unlock()
  c.data.store = store
  return c


def matched_config(main: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The main job's config with sparsify's schedule: warmup, then linear decay to 0."""
  c = ml_collections.ConfigDict(main.to_dict())
  c.optim.decay, c.optim.final_lr_fraction = 'linear', 0.0
  c.optim.decay_start_fraction = c.optim.warmup_steps / c.train.num_steps
  c.lock()
  return c


def write_rows(reader, n_train: int, steps: int, batch: int, seed: int, out: str):
  """rows.npy (the training rows, raw) and order.bin (int32 row numbers, shuffled per epoch)."""
  rows_path, order_path = os.path.join(out, 'rows.npy'), os.path.join(out, 'order.bin')
  if not os.path.exists(order_path):
    np.save(rows_path + '.tmp.npy', np.asarray(reader.read_rows(0, n_train), np.float32))
    os.rename(rows_path + '.tmp.npy', rows_path)
    rng, need, order = np.random.default_rng(seed), steps * batch, []
    while sum(len(o) for o in order) < need:
      order.append(rng.permutation(n_train).astype(np.int32))
    np.concatenate(order)[:need].tofile(order_path + '.tmp')
    os.rename(order_path + '.tmp', order_path)
  return rows_path, order_path


def train_peer(peers_python, script, args, out, sae_file):
  """Runs a peers' training script (skipped when `out` already holds its SAE)."""
  if os.path.exists(os.path.join(out, sae_file)):
    return
  command = [peers_python, os.path.join(TOOLS, script)] + args
  logging.info('running %s', ' '.join(command))
  subprocess.run(command, check=True, env=dict(os.environ, SPARSIFY_DISABLE_TRITON='1'))


def main(argv=None) -> int:
  parser = cli.ArgumentParser(prog=f'python tools/{os.path.basename(__file__)}', description=__doc__)
  parser.add_argument('--run', required=True, help='main-job run directory (store + sae/)')
  parser.add_argument('--out', required=True, help='directory for the runs and results')
  parser.add_argument('--peers_python', default='/work/peers-venv/bin/python')
  parser.add_argument('--ce_contexts', type=int, default=16)
  return cli.run_tool(_main, parser, argv, log_dir=lambda a: a.out)


def _main(args) -> int:
  os.makedirs(args.out, exist_ok=True)

  main_workdir = os.path.join(args.run, 'sae')
  _, run_config, run_info = ckpt_lib.read_metadata(ckpt_lib.checkpoint_dir(main_workdir))
  store = ckpt_lib.recorded_store(run_info, main_workdir)
  base = main_job_config(run_config, store)
  config = matched_config(base)
  reader = store_lib.StoreReader(store)
  site = reader.manifest['site']
  heldout, batch, steps = (config.data.heldout_tokens, config.train.batch_size,
                           config.train.num_steps)
  eval_batches = heldout // batch

  runs = {'dictlearn (main job, its own schedule)': main_workdir}
  dictlearn_dir = os.path.join(args.out, 'dictlearn')
  if ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(dictlearn_dir)) != steps:
    train_and_evaluate(config, dictlearn_dir)
  runs['dictlearn'] = dictlearn_dir

  rows, order = write_rows(reader, reader.n_rows - heldout, steps, batch, config.seed, args.out)
  lr, warmup = str(config.optim.learning_rate), str(config.optim.warmup_steps)
  shape = ['--k', str(config.sae.k), '--batch', str(batch), '--seed', str(config.seed)]
  sparsify_args = shape + ['--num_latents', str(config.sae.n_latents)]
  peers = {  # name: (script, arguments after ROWS ORDER OUT, the SAE directory in OUT)
      'sparsify adam': ('sparsify_train.py', sparsify_args + [
          '--optimizer', 'adam', '--lr', lr, '--warmup', warmup, '--auxk_alpha', str(AUXK_ALPHA),
          '--dead_feature_threshold', str(config.sae.dead_tokens_threshold)], 'run/layers.0'),
      'sparsify defaults': ('sparsify_train.py', sparsify_args + ['--optimizer', 'signum'],
                            'run/layers.0'),
      'SAELens topk': ('saelens_train.py', shape + [
          '--d_sae', str(config.sae.n_latents), '--lr', lr, '--warmup', warmup,
          '--dead_feature_window', str(max(1, config.sae.dead_tokens_threshold // batch)),
          '--hook_name', site], 'sae'),
  }
  for name, (script, extra, sae_subdir) in peers.items():
    out = os.path.join(args.out, name.replace(' ', '_'))
    sae_dir = os.path.join(out, sae_subdir)
    is_sparsify = script.startswith('sparsify')
    train_peer(args.peers_python, script, [rows, order, out] + extra, sae_dir,
               'sae.safetensors' if is_sparsify else 'sae_weights.safetensors')
    workdir = os.path.join(out, 'imported')
    if ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(workdir)) is None:
      if is_sparsify:
        sparsify.import_sparsify(sae_dir, workdir, store=store, site=site,
                                 base_config=base)
      else:
        saelens.import_saelens(sae_dir, workdir, store=store, base_config=base)
    runs[name] = workdir

  model = lm.load_gguf(harvest.resolve_model_path(reader.manifest['extra']['harvest']['model']),
                       with_tokenizer=False)
  results = {}
  for name, workdir in runs.items():
    results[name] = evals.evaluate_checkpoint(workdir, eval_batches=eval_batches,
                                              ce_contexts=args.ce_contexts, lm_model=model)
    logging.info('%s: %s', name, results[name])
  with open(os.path.join(args.out, 'quality.json'), 'w') as f:
    json.dump({'site': site, 'n_latents': config.sae.n_latents, 'k': config.sae.k,
               'batch_size': batch, 'steps': steps, 'tokens': steps * batch,
               'results': results}, f, indent=1)
  print(f'{site}, {config.sae.n_latents} latents, k={config.sae.k}, {steps} steps x {batch} '
        f'tokens, {results[name]["rows"]} held-out rows, CE on {args.ce_contexts} contexts\n')
  print('| SAE | FVU | L0 | dead fraction | CE loss recovered | KL |')
  print('| --- | --- | --- | --- | --- | --- |')
  for name, r in results.items():
    print(f"| {name} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.4f} | "
          f"{r.get('ce_loss_recovered', float('nan')):.4f} | {r.get('kl_spliced', float('nan')):.4f} |")
  return 0


if __name__ == '__main__':
  sys.exit(main())
