"""Tests of dictlearn.lm: GGUF loading, tokenizer, JAX Llama forward, hooks, generation.

The real model (SmolLM2-135M-Instruct, the GGUF that `python -m dictlearn.fetch`
caches) is loaded once per session (conftest's `smollm2` fixture). Reference figures come from transformers 5.23 / PyTorch 2.13
loading the same GGUF file (/work/shared/bench/peers/hf_forward.py).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pydoc_data.topics
import pytest

from dictlearn.lm import generate as gen
from dictlearn.lm import gguf, llama
from tiny_lm import write_tiny_gguf

TEXT = pydoc_data.topics.topics['assert'] + pydoc_data.topics.topics['if']
# transformers' tokenisation of TEXT (no BOS: the file says add_bos_token false).
HF_FIRST_IDS = [504, 476, 3391, 18, 4814, 198, 16540, 5398, 828, 198, 198, 46923, 7868, 359, 253,
                11541, 970, 288, 7258, 33665]
HF_N_IDS = 401
HF_PERPLEXITY = 17.23  # transformers on the first 256 tokens of TEXT
SITE = 'blocks.12.hook_resid_post'


@pytest.fixture(scope='module')
def short_batch(smollm2):
  _, _, tok = smollm2
  ids = tok.encode(TEXT)
  return jnp.asarray([ids[:40], ids[100:140]], dtype=jnp.int32)


# ---- loading and tokenizer -----------------------------------------------------------


def test_config_from_metadata(smollm2):
  cfg, params, _ = smollm2
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
  assert (cfg.d_mlp, cfg.vocab_size, cfg.rope_base, cfg.tie_embeddings) == (1536, 49152, 1e5, True)
  assert params['layers']['wq'].shape == (30, 576, 9, 64)
  assert params['layers']['wk'].shape == (30, 576, 3, 64)
  assert 'unembed' not in params


def test_missing_gguf_file_names_path(tmp_path):
  missing = tmp_path / 'nope.gguf'
  with pytest.raises(FileNotFoundError, match='nope.gguf'):
    gguf.load_gguf(str(missing))


def test_default_path_is_the_cached_file():
  assert gguf.default_gguf_path().endswith('SmolLM2-135M-Instruct.Q4_1.gguf')
  assert os.path.isfile(gguf.default_gguf_path())


def test_tokenizer_matches_transformers(smollm2):
  _, _, tok = smollm2
  ids = tok.encode(TEXT)
  assert len(ids) == HF_N_IDS and ids[:20] == HF_FIRST_IDS
  assert tok.decode(ids) == TEXT
  assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
  assert tok.encode('x', add_bos=True)[0] == tok.bos_id
  # Special tokens stay whole; digits split one by one.
  assert tok.encode('<|im_start|>user\n') == [1, 4093, 198]
  assert tok.encode('2024') == [34, 32, 34, 36]


def test_chat_template_renders_chatml(smollm2):
  _, _, tok = smollm2
  assert tok.is_chatml
  text = tok.render_chat([{'role': 'user', 'content': 'Hi'}])
  assert text == ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by '
                  'Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
  own_system = tok.render_chat([{'role': 'system', 'content': 'Be brief.'},
                                {'role': 'user', 'content': 'Hi'}], add_generation_prompt=False)
  assert own_system == '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
  with pytest.raises(ValueError, match='role'):
    tok.render_chat([{'content': 'no role'}])


# ---- forward -----------------------------------------------------------------------------


def test_perplexity_matches_pytorch_reference(smollm2):
  cfg, params, tok = smollm2
  tokens = jnp.asarray([tok.encode(TEXT)[:256]])
  assert abs(llama.perplexity(params, cfg, tokens) - HF_PERPLEXITY) < 0.05
  # Leaving llama.cpp's Q/K row order in place runs but is badly wrong.
  wrong = llama.perplexity(gguf.llamacpp_rope_permute(params), cfg, tokens)
  assert 200 < wrong < 250


def test_bfloat16_forward_accumulates_in_float32(smollm2):
  # bfloat16 weights and activations, float32 sums: 17.27 (with bfloat16 sums, 17.35).
  cfg, params, tok = smollm2
  bf16 = jax.tree.map(
      lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
  tokens = jnp.asarray([tok.encode(TEXT)[:256]])
  assert abs(llama.perplexity(bf16, cfg, tokens) - HF_PERPLEXITY) < 0.08


def test_identity_patch_leaves_logits_unchanged(smollm2, short_batch):
  cfg, params, _ = smollm2
  plain, _ = llama.forward(params, cfg, short_batch)
  patched, acts = llama.forward(params, cfg, short_batch, read_sites=[SITE],
                                patches={SITE: lambda x: x, 'hook_embed': lambda x: x})
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(patched))
  assert acts[SITE].shape == (2, 40, cfg.d_model)


def test_stop_at_deepest_equals_full_run(smollm2, short_batch):
  cfg, params, _ = smollm2
  sites = ['hook_embed', 'blocks.0.hook_resid_pre', 'blocks.3.hook_attn_out',
           'blocks.7.hook_mlp_out', 'blocks.7.hook_resid_mid', 'blocks.7.hook_resid_post', SITE]
  _, full = llama.forward(params, cfg, short_batch, read_sites=sites + ['ln_final.hook_normalized'])
  logits, early = llama.forward(params, cfg, short_batch, read_sites=sites, return_logits=False)
  assert logits is None and set(early) == set(sites)
  for site in sites:
    np.testing.assert_allclose(np.asarray(early[site]), np.asarray(full[site]), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(early['hook_embed']),
                                np.asarray(early['blocks.0.hook_resid_pre']))
  np.testing.assert_allclose(np.asarray(early['blocks.7.hook_resid_mid'] + early['blocks.7.hook_mlp_out']),
                             np.asarray(early['blocks.7.hook_resid_post']), rtol=1e-6, atol=1e-6)


def test_patch_changes_what_follows(smollm2, short_batch):
  cfg, params, _ = smollm2
  ablate = lambda x: jnp.zeros_like(x)
  sites = ['blocks.3.hook_resid_post', 'blocks.4.hook_resid_pre', 'blocks.2.hook_resid_post']
  _, clean = llama.forward(params, cfg, short_batch, read_sites=sites, return_logits=False)
  _, acts = llama.forward(params, cfg, short_batch, read_sites=sites,
                          patches={'blocks.3.hook_mlp_out': ablate}, return_logits=False)
  # Upstream untouched, the patched block's output changed, and the next block sees it.
  np.testing.assert_array_equal(np.asarray(acts['blocks.2.hook_resid_post']),
                                np.asarray(clean['blocks.2.hook_resid_post']))
  assert not np.allclose(acts['blocks.3.hook_resid_post'], clean['blocks.3.hook_resid_post'])
  np.testing.assert_array_equal(np.asarray(acts['blocks.4.hook_resid_pre']),
                                np.asarray(acts['blocks.3.hook_resid_post']))
  # A patched read site returns the patched value.
  _, acts = llama.forward(params, cfg, short_batch, read_sites=[SITE], patches={SITE: ablate},
                          return_logits=False)
  assert not np.any(acts[SITE])


def test_unknown_site_lists_valid_sites(smollm2, short_batch):
  cfg, params, _ = smollm2
  with pytest.raises(ValueError, match=r'blocks\.29\.hook_resid_post.*Did you mean'):
    llama.forward(params, cfg, short_batch, read_sites=['blocks.12.hook_resid_posst'])
  with pytest.raises(ValueError, match='Unknown hook site'):
    llama.forward(params, cfg, short_batch, patches={'blocks.30.hook_resid_pre': lambda x: x})
  sites = llama.valid_sites(2)
  assert sites[0] == 'hook_embed' and sites[-1] == 'ln_final.hook_normalized' and len(sites) == 12


def test_right_padded_batch_matches_unpadded(smollm2, short_batch):
  cfg, params, _ = smollm2
  n = 25
  tokens = short_batch.at[1, n:].set(0)
  mask = jnp.arange(40)[None] < jnp.asarray([[40], [n]])
  logits, _ = llama.forward(params, cfg, tokens, attention_mask=mask)
  alone, _ = llama.forward(params, cfg, short_batch[1:, :n])
  np.testing.assert_allclose(np.asarray(logits[1, :n]), np.asarray(alone[0]), rtol=1e-4, atol=1e-4)
  ce = llama.cross_entropy(logits, tokens, mask)
  assert np.isfinite(float(ce))


# ---- generation -----------------------------------------------------------------------


def test_greedy_chat_answers_paris(smollm2):
  cfg, params, tok = smollm2
  (reply,) = gen.chat(params, cfg, tok, 'What is the capital of France?', max_new_tokens=16)
  assert 'Paris' in reply


def test_batched_kv_cache_generation_matches_full_forward(smollm2):
  cfg, params, tok = smollm2
  prompts = [tok.encode_chat([{'role': 'user', 'content': q}]) for q in
             ('Name a colour.', 'What is two plus two? Answer in one word, please.')]
  prompts.append(tok.encode('The "assert" statement'))
  steps = 6
  batched = gen.generate(params, cfg, prompts, max_new_tokens=steps, eos_id=None)
  # Each prompt alone, unpadded, gives the same greedy continuation.
  for prompt, out in zip(prompts, batched):
    assert gen.generate(params, cfg, [prompt], max_new_tokens=steps, eos_id=None,
                        prompt_bucket=1) == [out]
  # The cached decoding agrees with recomputing everything: the argmax of a full forward over
  # prompt + generated tokens reproduces each generated token (right-padded batch).
  seqs = [p + o for p, o in zip(prompts, batched)]
  width = max(map(len, seqs))
  tokens = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)], mask[i, :len(s)] = s, True
  logits, _ = llama.forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  predicted = np.asarray(jnp.argmax(logits, axis=-1))
  for i, (p, o) in enumerate(zip(prompts, batched)):
    assert predicted[i, len(p) - 1:len(p) - 1 + steps].tolist() == o


def test_generation_patches_steer(smollm2):
  cfg, params, tok = smollm2
  prompt = [tok.encode_chat([{'role': 'user', 'content': 'What is the capital of France?'}])]
  # The arguments of test_greedy_chat_answers_paris: the compiled program is reused.
  kw = dict(max_new_tokens=16, eos_id=tok.eos_id, pad_id=tok.pad_id)
  plain = gen.generate(params, cfg, prompt, **kw)
  assert gen.generate(params, cfg, prompt, patches={SITE: lambda x: x}, **kw) == plain
  # Adding the embedding of ' Berlin', scaled past the residual norm (~100 at block 6), in the
  # prefill and at every decoding step makes the model say it over and over.
  berlin = params['embed'][tok.encode(' Berlin')[0]]
  steered = gen.generate(params, cfg, prompt, patches={
      'blocks.6.hook_resid_post': lambda x: x + 400.0 * berlin}, **kw)
  assert 'Paris' in tok.decode(plain[0])
  assert tok.decode(steered[0]).count('Berlin') >= 10


def test_sampling_is_seeded_and_valid(smollm2):
  cfg, params, tok = smollm2
  prompt = [tok.encode('Once upon a time')]
  kw = dict(max_new_tokens=5, eos_id=None, temperature=0.8, top_k=40, top_p=0.95)
  a = gen.generate(params, cfg, prompt, seed=1, **kw)
  b = gen.generate(params, cfg, prompt, seed=1, **kw)
  assert a == b and len(a[0]) == 5 and all(0 <= t < cfg.vocab_size for t in a[0])
  with pytest.raises(ValueError, match='top_p'):
    gen.generate(params, cfg, prompt, max_new_tokens=2, eos_id=None, top_p=0.0)


def test_filter_logits_top_k_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15], [0.1, 0.2, 0.3, 0.4]]))
  kept = lambda k, p: (np.asarray(gen._filter_logits(logits, k, p)) > -1e30).tolist()
  assert kept(2, 1.0) == [[True, False, True, False], [False, False, True, True]]
  # The nucleus: the most likely tokens until their mass reaches top_p.
  assert kept(0, 0.65) == [[True, False, True, False], [False, False, True, True]]
  assert kept(0, 0.1) == [[True, False, False, False], [False, False, False, True]]
  assert kept(1, 0.99) == [[True, False, False, False], [False, False, False, True]]
  assert kept(0, 1.0) == [[True] * 4] * 2


# ---- a tiny Llama GGUF (tests/tiny_lm.py): the loader beyond SmolLM2 ----------------------


def test_tiny_gguf_loads_any_llama(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / 'tiny.gguf'
  hf = write_tiny_gguf(path, rng)
  cfg, params, tok = gguf.load_gguf(str(path))
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp) == (
      2, 32, 4, 2, 8, 48)
  assert (cfg.rope_base, cfg.context_length, cfg.tie_embeddings, cfg.name) == (500.0, 128, False, 'tiny')
  lay = params['layers']
  np.testing.assert_allclose(lay['wq'][1], hf['1.attn_q'].T.reshape(32, 4, 8), atol=1e-6)
  np.testing.assert_allclose(lay['wk'][0], hf['0.attn_k'].T.reshape(32, 2, 8), atol=1e-6)
  np.testing.assert_allclose(lay['wo'][0], hf['0.attn_output'].T.reshape(4, 8, 32), atol=1e-6)
  np.testing.assert_allclose(lay['w_up'][1], hf['1.ffn_up'].T, atol=0.01)  # Q8_0
  np.testing.assert_allclose(lay['w_down'][1], hf['1.ffn_down'].T, atol=1e-6)
  np.testing.assert_allclose(params['embed'], hf['embed'], atol=2e-3)  # F16
  np.testing.assert_allclose(params['unembed'], hf['unembed'].T, atol=1e-6)
  # Untied unembedding: logits are the final normalised stream times output.weight.
  ids = tok.encode('hello world')
  assert ids[:2] == [tok.tokens.index('hell'), tok.tokens.index('o')]
  assert tok.decode(ids) == 'hello world'
  logits, acts = llama.forward(params, cfg, jnp.asarray([ids]), read_sites=['ln_final.hook_normalized'])
  np.testing.assert_allclose(np.asarray(logits[0]),
                             np.asarray(acts['ln_final.hook_normalized'][0] @ params['unembed']),
                             rtol=1e-5, atol=1e-5)
  assert tok.is_chatml and tok.default_system_prompt() is None
  bf16 = gguf.load_gguf(str(path), dtype=jnp.bfloat16, with_tokenizer=False)
  assert bf16[1]['layers']['wq'].dtype == jnp.bfloat16 and bf16[2] is None
  assert llama.forward(bf16[1], cfg, jnp.asarray([ids]))[0].dtype == jnp.float32


def test_steering_values_vary_without_recompiling(tmp_path):
  path = tmp_path / 'tiny.gguf'
  write_tiny_gguf(path, np.random.default_rng(1))
  cfg, params, tok = gguf.load_gguf(str(path))
  tokens = jnp.asarray([tok.encode('hello world')])

  @jax.jit
  def steered(params, tokens, vec):  # the patch closes over a traced vector
    return llama.forward(params, cfg, tokens,
                         patches={'blocks.0.hook_resid_post': lambda x: x + vec})[0]

  plain, _ = llama.forward(params, cfg, tokens)
  zero = steered(params, tokens, jnp.zeros(cfg.d_model))
  pushed = steered(params, tokens, jnp.ones(cfg.d_model))
  np.testing.assert_allclose(np.asarray(zero), np.asarray(plain), rtol=1e-5, atol=1e-5)
  assert not np.allclose(pushed, plain)
  assert steered._cache_size() == 1


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
  bad = tmp_path / 'bad.gguf'
  bad.write_bytes(b'not a gguf file at all')
  with pytest.raises(ValueError, match='bad.gguf'):
    gguf.load_gguf(str(bad))
