"""Models from Hugging Face directories: the same weights as a GGUF file give the same model.

Tiny random models (tests/tiny_lm.py) are written both ways; a Qwen2-style
model with attention biases is checked against a numpy forward written here.
"""
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dictlearn import harvest as harvest_lib
from dictlearn import lm
from dictlearn.data import store
from dictlearn.lm import llama
from experiments import harvest_smollm2
import tiny_lm

TEXT = 'hello world <|im_start|>user\nhello<|im_end|>'


def _logits(model, ids, sites=()):
  cfg, params, _ = model
  return llama.forward(params, cfg, jnp.asarray([ids]), read_sites=sites)


def test_hf_directory_matches_the_gguf_file(tmp_path):
  weights = tiny_lm.write_tiny_gguf(tmp_path / 'tiny.gguf', np.random.default_rng(0))
  # The HF copy holds what the GGUF holds (F16 embeddings, a Q8_0 matrix), in two shards.
  directory = tiny_lm.write_tiny_hf(tmp_path / 'tiny_hf', tiny_lm.gguf_held(weights), shards=2)
  from_gguf = lm.load_model(str(tmp_path / 'tiny.gguf'))
  from_hf = lm.load_model(str(directory))
  a, b = from_gguf[0], from_hf[0]
  for field in ('n_layers', 'd_model', 'n_heads', 'n_kv_heads', 'head_dim', 'd_mlp', 'vocab_size',
                'rope_base', 'rms_eps', 'context_length', 'tie_embeddings'):
    assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-6), field  # GGUF: f32
  gguf_tok, hf_tok = from_gguf[2], from_hf[2]
  ids = hf_tok.encode(TEXT)
  assert ids == gguf_tok.encode(TEXT) and hf_tok.decode(ids) == TEXT
  assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.add_bos) == (gguf_tok.bos_id, gguf_tok.eos_id, False)
  assert hf_tok.chat_template == gguf_tok.chat_template and hf_tok.is_chatml
  site = 'blocks.1.hook_resid_mid'
  logits_gguf, acts_gguf = _logits(from_gguf, ids, [site])
  logits_hf, acts_hf = _logits(from_hf, ids, [site])
  np.testing.assert_allclose(np.asarray(logits_hf), np.asarray(logits_gguf), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(acts_hf[site]), np.asarray(acts_gguf[site]), rtol=1e-5,
                             atol=1e-5)


def test_tied_bfloat16_checkpoint(tmp_path):
  weights = tiny_lm.random_weights(np.random.default_rng(1), n_layers=1)
  directory = tiny_lm.write_tiny_hf(tmp_path / 'tied', weights, tie=True, dtype=ml_dtypes.bfloat16)
  cfg, params, tok = lm.load_model(str(directory), dtype=jnp.bfloat16, with_tokenizer=False)
  assert cfg.tie_embeddings and 'unembed' not in params and tok is None
  assert params['layers']['wq'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(params['embed'], np.float32),
                                weights['embed'].astype(ml_dtypes.bfloat16).astype(np.float32))
  logits, acts = llama.forward(params, cfg, jnp.asarray([[5, 6, 7]]),
                               read_sites=['ln_final.hook_normalized'])
  h = np.asarray(acts['ln_final.hook_normalized'][0], np.float32)
  np.testing.assert_allclose(np.asarray(logits[0]), h @ np.asarray(params['embed'], np.float32).T,
                             rtol=2e-2, atol=2e-2)  # bf16 inputs, f32 accumulation


# ---- Qwen2: attention biases, against numpy ---------------------------------------------


def _numpy_forward(w, biases, tokens, heads, kv_heads, eps=1e-6, theta=500.0):
  """The Llama/Qwen2 forward in float64 numpy: logits (seq, vocab)."""
  x = w['embed'][tokens].astype(np.float64)
  t, d = x.shape
  hd, group = d // heads, heads // kv_heads
  angles = np.arange(t)[:, None] / theta ** (np.arange(hd // 2) * 2.0 / hd)
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

  def rms(v, g):
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * g

  def rope(v):  # (t, heads, hd), half-split layout
    a, b = v[..., :hd // 2], v[..., hd // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

  causal = np.tril(np.ones((t, t), dtype=bool))
  n_layers = 1 + max(int(k.split('.')[0]) for k in w if k[0].isdigit())
  for i in range(n_layers):
    h = rms(x, w[f'{i}.attn_norm'])
    q, k, v = (h @ w[f'{i}.attn_{n}'].T + biases.get(f'{i}.{n}', 0) for n in 'qkv')
    q, k, v = rope(q.reshape(t, heads, hd)), rope(k.reshape(t, -1, hd)), v.reshape(t, -1, hd)
    out = np.empty((t, heads, hd))
    for head in range(heads):  # query head h reads key/value head h // group
      s = np.where(causal, q[:, head] @ k[:, head // group].T / np.sqrt(hd), -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, head // group]
    x = x + out.reshape(t, d) @ w[f'{i}.attn_output'].T
    h = rms(x, w[f'{i}.ffn_norm'])
    gate, up = h @ w[f'{i}.ffn_gate'].T, h @ w[f'{i}.ffn_up'].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f'{i}.ffn_down'].T
  return rms(x, w['final_norm']) @ w['unembed'].T


def test_qwen2_attention_biases_match_numpy(tmp_path):
  rng = np.random.default_rng(2)
  weights = tiny_lm.random_weights(rng, n_layers=2)
  biases = {f'{i}.{n}': rng.normal(size=32 if n == 'q' else 16).astype(np.float32)
            for i in range(2) for n in 'qkv'}
  directory = tiny_lm.write_tiny_hf(tmp_path / 'qwen', weights, biases=biases, model_type='qwen2',
                                    architectures=['Qwen2ForCausalLM'], sliding_window=4,
                                    use_sliding_window=False)
  model = lm.load_model(str(directory))
  assert model[1]['layers']['bq'].shape == (2, 4, 8) and model[1]['layers']['bk'].shape == (2, 2, 8)
  assert model[0].context_length == 128  # use_sliding_window false: the window does not apply
  ids = model[2].encode('hello world, hello')
  logits, _ = _logits(model, ids)
  np.testing.assert_allclose(np.asarray(logits[0]), _numpy_forward(weights, biases, ids, 4, 2),
                             rtol=1e-4, atol=1e-4)
  # Zero biases: the bias-free model.
  zero = tiny_lm.write_tiny_hf(tmp_path / 'zero', weights, model_type='qwen2',
                               biases={k: np.zeros_like(b) for k, b in biases.items()})
  plain = tiny_lm.write_tiny_hf(tmp_path / 'plain', weights)
  np.testing.assert_array_equal(np.asarray(_logits(lm.load_model(str(zero)), ids)[0]),
                                np.asarray(_logits(lm.load_model(str(plain)), ids)[0]))
  assert 'bq' not in lm.load_model(str(plain))[1]['layers']


# ---- what is refused, and how -------------------------------------------------------


def test_a_model_id_says_what_to_download():
  with pytest.raises(FileNotFoundError,
                     match='huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir DIR'):
    lm.load_model('HuggingFaceTB/SmolLM2-135M')
  with pytest.raises(FileNotFoundError, match=r'config\.model: .*--config\.model=DIR'):
    harvest_lib.resolve_model_path('Qwen/Qwen2.5-0.5B')
  with pytest.raises(FileNotFoundError, match='no file or directory at'):
    lm.load_model('/nowhere/model.gguf')


@pytest.mark.parametrize('change, message', [
    ({'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}, "rope_scaling of type 'llama3'"),
    ({'model_type': 'gpt2'}, "model_type 'gpt2'"),
    ({'attention_bias': True}, 'attention_bias'),
    ({'hidden_act': 'gelu'}, "hidden_act 'gelu'"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, change, message):
  weights = tiny_lm.random_weights(np.random.default_rng(3), n_layers=1)
  directory = tiny_lm.write_tiny_hf(tmp_path / 'm', weights, **change)
  with pytest.raises(ValueError, match=message):
    lm.load_model(str(directory))


def test_missing_weights_and_mistral_window(tmp_path):
  weights = tiny_lm.random_weights(np.random.default_rng(4), n_layers=1)
  directory = tiny_lm.write_tiny_hf(tmp_path / 'm', weights, model_type='mistral',
                                    sliding_window=64)
  assert lm.load_model(str(directory), with_tokenizer=False)[0].context_length == 64
  (directory / 'model.safetensors').rename(directory / 'pytorch_model.bin')
  with pytest.raises(FileNotFoundError, match='neither model.safetensors.*PyTorch .bin'):
    lm.load_model(str(directory))
  with pytest.raises(FileNotFoundError, match='has no config.json'):
    lm.load_model(str(tmp_path))


# ---- the harvest ---------------------------------------------------------------------


def test_harvest_from_a_hf_directory(tmp_path):
  weights = tiny_lm.random_weights(np.random.default_rng(5), n_layers=2)
  directory = tiny_lm.write_tiny_hf(tmp_path / 'tiny_hf', weights)
  config = harvest_smollm2.get_config('tiny')
  with config.unlocked():
    config.update(model=str(directory), token_budget=300, progress=False,
                  sites=('blocks.1.hook_resid_post',))
  summary = harvest_lib.harvest(config, tmp_path / 'out')
  assert summary['n_tokens'] == 300
  reader = store.StoreReader(str(tmp_path / 'out' / 'blocks.1.hook_resid_post'))
  manifest = reader.manifest
  assert manifest['model'] == 'tiny_hf'
  model = manifest['extra']['model']
  assert model['format'] == 'hf' and len(model['sha256']) == 64 and model['n_layers'] == 2
  assert harvest_lib.harvested_model_path(manifest) == model['path'] == os.path.abspath(directory)
  record = json.loads((tmp_path / 'out' / 'harvest.json').read_text())
  assert record['model']['file'] == 'tiny_hf' and record['model']['bytes'] > 0
  # The first context's rows are the model's activations at its non-BOS positions.
  cfg, params, tok = lm.load_model(str(directory))
  tokens = reader.read_tokens(0, 63)
  _, acts = llama.forward(params, cfg, jnp.asarray([[tok.bos_id, *tokens]]),
                          read_sites=['blocks.1.hook_resid_post'])
  np.testing.assert_allclose(reader.read_rows(0, 63), np.asarray(acts['blocks.1.hook_resid_post'][0, 1:]),
                             rtol=1e-5, atol=1e-5)
