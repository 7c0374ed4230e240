"""Evaluation of a trained SAE: held-out reconstruction, and the SAE spliced into its model.

    python -m dictlearn.evals --workdir DIR [--step N] [--ce_contexts N]

The reconstruction metrics (FVU, L0, dead and dense latents) live below the
trainer, in `dictlearn.sae.evaluation`; this module adds what needs a run's
checkpoint and the language model its store was harvested from: CE loss
recovered and KL with the SAE spliced in at its site. Results go to the run's
metrics.jsonl and TensorBoard (split 'eval') and are printed as JSON.
"""
import functools
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dictlearn import cli
from dictlearn import harvest
from dictlearn import lm
from dictlearn.data import loader as loader_lib
from dictlearn.data import store as store_lib
from dictlearn.lm import llama
from dictlearn.sae import make_sae
from dictlearn.sae.base import SparseAutoencoder
from dictlearn.sae.evaluation import evaluate_reconstruction
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train import metrics as metrics_lib

log = logging.getLogger(__name__)

__all__ = ['ce_loss_recovered', 'evaluate_checkpoint', 'evaluate_reconstruction',
           'heldout_contexts', 'record_evaluation']


# ---------------------------------------------------------------------------
# The SAE spliced into the language model
# ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _splice_sums(sae: SparseAutoencoder, lm_cfg, site: str, params, buffers, lm_params,
                 tokens, data_scale, bos_id):
  keep = tokens != bos_id  # BOS activations are outliers the SAE never saw: left as they are

  def splice(x):
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * data_scale
    rebuilt = (sae.reconstruct(params, buffers, flat) / data_scale).reshape(x.shape)
    return jnp.where(keep[..., None], rebuilt.astype(x.dtype), x)

  def zero(x):
    return jnp.where(keep[..., None], jnp.zeros_like(x), x)

  def log_probs(patch):
    logits, _ = llama.forward(lm_params, lm_cfg, tokens,
                              patches=None if patch is None else {site: patch})
    return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)

  target = tokens[:, 1:, None]
  nll = lambda lp: -jnp.sum(jnp.take_along_axis(lp, target, axis=-1))
  clean = log_probs(None)
  spliced = log_probs(splice)
  sums = {'ce_clean': nll(clean), 'ce_spliced': nll(spliced),
          'kl_spliced': jnp.sum(jnp.exp(clean) * (clean - spliced))}
  sums['ce_zero_ablation'] = nll(log_probs(zero))
  return sums


def ce_loss_recovered(sae: SparseAutoencoder, params, buffers, lm_cfg, lm_params,
                      contexts: np.ndarray, *, site: str, data_scale: float, bos_id: int,
                      batch_size: int = 4) -> dict:
  """Cross-entropy of the LM with the SAE spliced in at `site`, against clean and zero.

  CE loss recovered = (CE_zero_ablation - CE_spliced) / (CE_zero_ablation - CE_clean):
  1 when splicing costs nothing, 0 when it is as bad as erasing the site. The KL
  divergence is KL(clean || spliced) per predicted token. Only non-BOS positions
  are replaced (by the reconstruction, or by zeros for the ablation).

  Args:
    sae, params, buffers: the trained SAE (trained on activations times `data_scale`).
    lm_cfg, lm_params: the language model the activations came from.
    contexts: int [n_contexts, seq] token ids, each context starting with BOS.
    site: the hook site the SAE was trained on.
    data_scale: the run's normalisation factor (activations were multiplied by it).
    bos_id: the BOS token id.
    batch_size: contexts per forward pass.

  Returns:
    {'ce_clean', 'ce_spliced', 'ce_zero_ablation', 'ce_loss_recovered', 'kl_spliced',
     'ce_tokens'} (losses in nats per predicted token).
  """
  contexts = np.asarray(contexts, np.int32)
  if contexts.ndim != 2 or contexts.shape[0] == 0 or contexts.shape[1] < 2:
    raise ValueError(f'contexts must be [n_contexts >= 1, seq >= 2] token ids, got shape '
                     f'{contexts.shape}')
  totals = None
  for start in range(0, contexts.shape[0], batch_size):
    batch = jnp.asarray(contexts[start:start + batch_size])
    sums = jax.device_get(_splice_sums(sae, lm_cfg, site, params, buffers, lm_params, batch,
                                       jnp.float32(data_scale), jnp.int32(bos_id)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  n = contexts.shape[0] * (contexts.shape[1] - 1)
  out = {name: float(value) / n for name, value in totals.items()}
  out['ce_loss_recovered'] = ((out['ce_zero_ablation'] - out['ce_spliced'])
                              / (out['ce_zero_ablation'] - out['ce_clean']))
  out['ce_tokens'] = n
  return out


def heldout_contexts(reader, heldout_tokens: int, context_length: int, bos_id: int,
                     max_contexts: int) -> np.ndarray:
  """Token contexts rebuilt from a harvested store's held-out rows.

  The store keeps the tokens of every row with its document index, BOS rows
  left out; the held-out rows are the last `heldout_tokens`. They are packed
  again as the harvester packs: every context starts with BOS and a BOS stands
  between documents.

  Returns:
    int32 [n, context_length], n <= max_contexts (only whole contexts).

  Raises:
    ValueError: the store records no token ids, or too few for one context.
  """
  start = reader.n_rows - heldout_tokens
  tokens = np.asarray(reader.read_tokens(start, reader.n_rows))
  docs = np.asarray(reader.read_doc(start, reader.n_rows))
  if tokens.size and tokens.min() < 0:
    raise ValueError(f'store at {reader.path} records no token ids (tokens = -1): CE loss '
                     'recovered needs a harvested store')
  contexts, current = [], [bos_id]

  def push(token):
    current.append(token)
    if len(current) == context_length:
      contexts.append(list(current))
      del current[1:]

  previous_doc = docs[0] if docs.size else -1
  for token, doc in zip(tokens.tolist(), docs.tolist()):
    if len(contexts) >= max_contexts:
      break
    if doc != previous_doc and len(current) > 1:
      push(bos_id)  # the separator between documents
    previous_doc = doc
    push(token)
  contexts = contexts[:max_contexts]
  if not contexts:
    raise ValueError(f'the {heldout_tokens} held-out rows of {reader.path} do not fill one '
                     f'context of {context_length} tokens')
  return np.asarray(contexts, np.int32)


def evaluate_checkpoint(workdir: str, step: int | None = None, *, eval_batches: int | None = None,
                        ce_contexts: int | None = None, lm_model=None) -> dict:
  """Evaluates a run's checkpoint on its held-out rows, and in its LM when it has one.

  Args:
    workdir: the run directory (or a pipeline's directory, whose run is `sae/`).
    step: checkpoint step (default: the latest).
    eval_batches: held-out batches (default: the run's `train.eval_batches`).
    ce_contexts: contexts for CE loss recovered (default: the run's
      `train.ce_contexts`; 0 skips it); used only when the run's store was
      harvested from a language model.
    lm_model: an already loaded (cfg, params, tokenizer), to skip loading.

  Returns:
    The reconstruction metrics, plus the CE metrics when computed, and the step.

  Raises:
    FileNotFoundError: no checkpoint, or the run's store is gone.
  """
  workdir = ckpt_lib.run_directory(workdir)
  directory = ckpt_lib.checkpoint_dir(workdir)
  step, config, run_info = ckpt_lib.read_metadata(directory, step)
  _, state = ckpt_lib.restore_arrays(directory, step)
  config = ml_collections.ConfigDict(config)
  reader = store_lib.StoreReader(ckpt_lib.recorded_store(run_info, workdir),
                                 d_model=run_info['d_model'])
  sae = make_sae(config.sae, run_info['d_model'])
  scale = run_info['data_scale']
  heldout = config.data.heldout_tokens
  n_batches = config.train.eval_batches if eval_batches is None else eval_batches
  ce_contexts = config.train.ce_contexts if ce_contexts is None else ce_contexts
  batch_size = min(config.train.batch_size, heldout)
  out = {'step': step, **evaluate_reconstruction(
      sae, state['params'], state['buffers'],
      loader_lib.heldout_batches(reader, batch_size, max(1, min(n_batches, heldout // batch_size)),
                                 heldout_tokens=heldout, scale=scale, sharding=None),
      dense_threshold=config.sae.dense_threshold)}
  extra = reader.manifest.get('extra') or {}
  if ce_contexts > 0 and 'harvest' in extra:
    lm_cfg, lm_params, _ = lm_model or lm.load_model(
        harvest.harvested_model_path(reader.manifest), with_tokenizer=False)
    contexts = heldout_contexts(reader, heldout, extra['context_length'], extra['bos_id'],
                                ce_contexts)
    out.update(ce_loss_recovered(sae, state['params'], state['buffers'], lm_cfg, lm_params,
                                 contexts, site=reader.manifest['site'], data_scale=scale,
                                 bos_id=extra['bos_id']))
  return out


def record_evaluation(workdir: str, step: int, evaluation: dict) -> None:
  """Adds `evaluation` to the run's 'eval' record at `step` (metrics.jsonl, TensorBoard).

  Fields already recorded at that step (the trainer's held-out evaluation) are
  kept unless `evaluation` has them too.
  """
  workdir = ckpt_lib.run_directory(workdir)
  previous = next((r for r in metrics_lib.read_metrics(workdir, 'eval') if r['step'] == step), {})
  fields = {k: v for k, v in {**previous, **evaluation}.items()
            if k not in ('step', 'split') and isinstance(v, (int, float))}
  writer = metrics_lib.MetricWriter(workdir)
  writer.write(step, fields, prefix='eval')
  writer.close()


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m dictlearn.evals', description=__doc__)
  parser.add_argument('--workdir', required=True,
                      help="run directory (or a pipeline's directory: its run is sae/)")
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
  parser.add_argument('--eval_batches', type=int, default=None,
                      help="held-out batches (default: the run's train.eval_batches)")
  parser.add_argument('--ce_contexts', type=int, default=None,
                      help="contexts for CE loss recovered (default: the run's "
                           "train.ce_contexts; 0 skips it)")
  return parser


def _main(args) -> int:
  result = evaluate_checkpoint(args.workdir, args.step, eval_batches=args.eval_batches,
                               ce_contexts=args.ce_contexts)
  record_evaluation(args.workdir, result['step'], result)
  print(json.dumps(result, indent=2))
  return 0


def main(argv=None) -> int:
  """python -m dictlearn.evals --workdir DIR [--step N] [--ce_contexts N]"""
  parser = _parser()
  return cli.run_tool(_main, parser, argv,
                      log_dir=lambda a: ckpt_lib.run_directory(a.workdir)
                      if os.path.isdir(a.workdir) else None)


if __name__ == '__main__':
  sys.exit(main())
