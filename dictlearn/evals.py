"""Evaluation of a trained SAE on held-out rows: FVU, L0, dead and dense latents.

FVU (fraction of variance unexplained) = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
over all evaluated rows, with the mean taken over those rows. L0 = mean number
of active latents per row. A latent is *dead* on the held-out set if it never
fires there, *dense* if it fires on more than `dense_threshold` of the rows.
Inference encoding is used (batchtopk: its learned threshold, not batch top-k).
"""
from collections.abc import Iterable
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.sae.base import SparseAutoencoder

_ROWS_PER_CALL = 1024  # bounds the dense [rows, n_latents] code held at once


@functools.partial(jax.jit, static_argnums=0)
def _reconstruction_sums(sae: SparseAutoencoder, params, buffers, x):
  acts = sae.encode(params, buffers, x)
  x_hat = sae.decode(params, acts)
  active = acts > 0
  return {
      'sum_x': jnp.sum(x, axis=0, dtype=jnp.float32),
      'sum_sq_x': jnp.sum(jnp.square(x), dtype=jnp.float32),
      'sum_sq_err': jnp.sum(jnp.square(x - x_hat), dtype=jnp.float32),
      'l0': jnp.sum(active, dtype=jnp.float32),
      'fired': jnp.sum(active, axis=0, dtype=jnp.float32),
  }


def evaluate_reconstruction(sae: SparseAutoencoder, params, buffers,
                            batches: Iterable, *, dense_threshold: float) -> dict:
  """FVU, MSE, L0, dead and dense fractions over `batches` of [rows, d_model].

  Args:
    sae: the architecture.
    params, buffers: its trained state.
    batches: arrays of held-out rows (already normalised like the training data).
    dense_threshold: firing rate above which a latent counts as dense.

  Returns:
    {'fvu', 'mse', 'l0', 'dead_fraction', 'dense_fraction', 'rows'}.

  Raises:
    ValueError: `batches` yields no rows.
  """
  totals, rows = None, 0
  for batch in batches:
    batch = np.asarray(batch, np.float32)
    for start in range(0, batch.shape[0], _ROWS_PER_CALL):
      chunk = batch[start:start + _ROWS_PER_CALL]
      sums = jax.device_get(_reconstruction_sums(sae, params, buffers, jnp.asarray(chunk)))
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
      rows += chunk.shape[0]
  if not rows:
    raise ValueError('evaluation got no held-out rows; set data.heldout_tokens > 0 '
                     'and train.eval_batches > 0')
  mean = totals['sum_x'] / rows
  total_variance = totals['sum_sq_x'] - rows * float(np.sum(mean * mean))
  frequency = totals['fired'] / rows
  return {
      'fvu': float(totals['sum_sq_err'] / total_variance),
      'mse': float(totals['sum_sq_err'] / rows),
      'l0': float(totals['l0'] / rows),
      'dead_fraction': float(np.mean(frequency == 0)),
      'dense_fraction': float(np.mean(frequency > dense_threshold)),
      'rows': rows,
  }


# ---------------------------------------------------------------------------
# The SAE spliced into the language model
# ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _splice_sums(sae: SparseAutoencoder, lm_cfg, site: str, params, buffers, lm_params,
                 tokens, data_scale, bos_id):
  from dictlearn.lm import llama  # evals sits above lm; imported here to keep plain evals light
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
