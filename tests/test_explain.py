"""Explaining a prompt: SmolLM2 to the SAE's site, the run's scale, the SAE's encode."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn import lm
from dictlearn.analysis import explain
from dictlearn.analysis import features
from dictlearn.data import store as store_lib
from dictlearn.train import checkpoint as ckpt_lib
from dictlearn.train.trainer import train_and_evaluate
from experiments import tiny

SITE = 'blocks.1.hook_resid_post'


def _harvest_like_run(root, model_file):
  """A tiny SAE trained on random rows of a store that says it was harvested from SmolLM2."""
  rng = np.random.default_rng(0)
  path = os.path.join(root, 'store')
  writer = store_lib.StoreWriter(path, 576, chunk_rows=512, shard_chunks=2, metadata={
      'model': model_file, 'site': SITE,
      'extra': {'harvest': {'model': ''}, 'bos_id': 1, 'context_length': 256}})
  writer.append(rng.standard_normal((2048, 576)).astype(np.float32),
                tokens=rng.integers(2, 1000, 2048), doc=np.zeros(2048), pos=np.arange(2048))
  writer.finish()
  config = tiny.get_config('jumprelu')
  config.unlock()
  config.data.store, config.data.heldout_tokens = path, 256
  config.train.num_steps, config.train.checkpoint_every, config.train.eval_batches = 2, 2, 0
  config.lock()
  workdir = os.path.join(root, 'sae')
  train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_explain_prompt_matches_encode(smollm2, tmp_path):
  cfg, params, tokenizer = smollm2
  workdir = _harvest_like_run(str(tmp_path), os.path.basename(lm.default_gguf_path()))
  explainer = explain.Explainer(workdir, lm_model=smollm2)
  text = 'The list of keys in a dictionary'
  result = explainer.explain(text, n_top=4)
  assert result.tokens.tolist() == [1] + tokenizer.encode(text, add_bos=False)
  assert not result.scored[0] and (result.latents[0] == -1).all()
  _, acts = lm.forward(params, cfg, jnp.asarray(result.tokens)[None], read_sites=[SITE],
                       return_logits=False)
  run = features.open_run(workdir)
  _, state = ckpt_lib.restore_arrays(ckpt_lib.checkpoint_dir(workdir))
  dense = np.asarray(run.sae.encode(state['params'], state['buffers'],
                                    acts[SITE][0].astype(jnp.float32) * run.data_scale))[1:]
  top = -np.sort(-dense, axis=1)[:, :4]
  np.testing.assert_allclose(result.values[1:], np.maximum(top, 0), rtol=1e-5, atol=1e-5)
  picked = np.take_along_axis(dense, np.maximum(result.latents[1:], 0), axis=1)
  np.testing.assert_allclose(np.where(result.latents[1:] >= 0, picked, 0), result.values[1:],
                             rtol=1e-5, atol=1e-5)
  assert result.descriptions == {}  # no statistics computed for this run
  lines = explain.format_text(result)
  assert "' list'" in lines and '#' in lines
  site = str(tmp_path / 'site')
  page = explain.write_html(result, site, text)
  body = open(page, encoding='utf-8').read()
  assert f'index.html#f={result.latents[1, 0]}' in body and 'BOS: not encoded' in body
  assert os.path.basename(page) in open(os.path.join(site, 'data', 'explains.js')).read()


def test_explain_refuses_a_synthetic_run(tiny_feature_run):
  with pytest.raises(ValueError, match='records no language model'):
    explain.Explainer(tiny_feature_run)
