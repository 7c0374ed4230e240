"""Stage 3 of the feature statistics: each latent's effect on the output logits."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from dictlearn.analysis import zarr_io

_LOGIT_BLOCK = 1024        # latents per unembedding matmul


@jax.jit
def _logit_block(w_dec, final_norm, unembed):
  """Logit effects [L, vocab] of decoder rows w_dec [L, d]; unembed is [vocab, d]."""
  return jnp.dot(w_dec * final_norm, unembed.T, preferred_element_type=jnp.float32)


def logit_effects(w_dec, lm_cfg, lm_params, n_logits, *, data_scale=1.0, progress=False,
                  on_block=None, start=0):
  """Top promoted and suppressed tokens of each decoder direction.

  The effect of latent l on the logits, per unit of activation, ignoring the final
  norm's division by the residual's RMS: (W_dec[l] / data_scale) * final_norm @ W_U.

  Args:
    w_dec: [n, d] decoder rows (numpy or jax).
    lm_cfg, lm_params: the language model (`dictlearn.lm`).
    n_logits: tokens kept each way.
    data_scale: the run's input scale (W_dec lives in scaled units).
    progress: show a tqdm bar.
    on_block: optional callback(start, stop, result) after each block; when given,
      nothing is accumulated and None is returned.
    start: first latent (resume).

  Returns:
    {'promoted_ids', 'promoted_values', 'suppressed_ids', 'suppressed_values'},
    each [n, n_logits].
  """
  unembed = (lm_params['embed'] if lm_cfg.tie_embeddings else lm_params['unembed'].T)
  unembed = jnp.asarray(unembed, jnp.float32)
  final_norm = jnp.asarray(lm_params['final_norm'], jnp.float32)
  if w_dec.shape[1] != unembed.shape[1]:
    raise ValueError(f'decoder rows have d_model={w_dec.shape[1]}; the language model has '
                     f'd_model={unembed.shape[1]}')
  n = w_dec.shape[0]
  parts = []
  for lo in tqdm.tqdm(range(start, n, _LOGIT_BLOCK), desc='logits', unit='block',
                      file=sys.stderr, disable=not progress):
    hi = min(lo + _LOGIT_BLOCK, n)
    effect = _logit_block(jnp.asarray(w_dec[lo:hi], jnp.float32) / data_scale, final_norm,
                          unembed)
    top_v, top_i = jax.lax.top_k(effect, n_logits)
    bottom_v, bottom_i = jax.lax.top_k(-effect, n_logits)
    block = {'promoted_ids': np.asarray(top_i), 'promoted_values': np.asarray(top_v),
             'suppressed_ids': np.asarray(bottom_i), 'suppressed_values': -np.asarray(bottom_v)}
    if on_block is not None:
      on_block(lo, hi, block)
    else:
      parts.append(block)
  if on_block is not None:
    return None
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None


def run_logits(run, out, params, lm_model, options, progress, save_progress):
  """Stage 3 of `features.compute_statistics`: logits/ in blocks of latents, resuming
  at `progress['logits_done']`."""
  lm_cfg, lm_params, _ = lm_model
  n = run.sae.n_latents
  names = ('promoted_ids', 'promoted_values', 'suppressed_ids', 'suppressed_values')
  if progress['logits_done'] == 0:
    for name in names:
      zarr_io.create(os.path.join(out, 'logits', name), (n, options.n_logits),
                     np.int32 if name.endswith('ids') else np.float32, 4096)
  arrays = {name: zarr_io.open_array(os.path.join(out, 'logits', name)) for name in names}

  def on_block(lo, hi, block):
    for name in names:
      arrays[name][lo:hi].write(block[name]).result()
    progress['logits_done'] = hi
    save_progress()

  w_dec = np.asarray(jax.device_get(params['W_dec']))
  logit_effects(w_dec, lm_cfg, lm_params, options.n_logits, data_scale=run.data_scale,
                progress=options.progress, on_block=on_block, start=progress['logits_done'])
