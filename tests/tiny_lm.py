"""Tiny random Llama models written to disk, as a GGUF file and as a Hugging Face directory.

The two writers take the same weights (Hugging Face orientation: (out, in)
matrices, half-split rotary rows), so a test can load one model both ways and
compare the forwards.
"""
import json
import os

import gguf as gguf_lib
import numpy as np
import safetensors.numpy
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from dictlearn.lm import gguf

SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
MERGES = ['h e', 'l l', 'he ll', 'Ġ w']
CHAT_TEMPLATE = "{{'<|im_start|>' + message['role'] + '\n'}}"
# GGUF block tensor name -> Hugging Face name after 'model.layers.{i}.'.
HF_NAMES = {'attn_q': 'self_attn.q_proj.weight', 'attn_k': 'self_attn.k_proj.weight',
            'attn_v': 'self_attn.v_proj.weight', 'attn_output': 'self_attn.o_proj.weight',
            'ffn_gate': 'mlp.gate_proj.weight', 'ffn_up': 'mlp.up_proj.weight',
            'ffn_down': 'mlp.down_proj.weight', 'attn_norm': 'input_layernorm.weight',
            'ffn_norm': 'post_attention_layernorm.weight'}


def _byte_alphabet():
  """GPT-2's bytes_to_unicode alphabet, in byte order."""
  keep = list(range(ord('!'), ord('~') + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


TOKENS = SPECIALS + _byte_alphabet() + ['he', 'll', 'hell', 'Ġw']


def random_weights(rng, n_layers=2, d=32, heads=4, kv_heads=2, d_mlp=48):
  """Random weights: 'embed', 'unembed' (vocab, d), 'final_norm', '{layer}.{gguf name}'."""
  vocab, hd = len(TOKENS), d // heads
  w = {'embed': rng.normal(size=(vocab, d)), 'unembed': rng.normal(size=(vocab, d)),
       'final_norm': 1 + 0.1 * rng.normal(size=d)}
  shapes = {'attn_q': (heads * hd, d), 'attn_k': (kv_heads * hd, d), 'attn_v': (kv_heads * hd, d),
            'attn_output': (d, heads * hd), 'ffn_gate': (d_mlp, d), 'ffn_up': (d_mlp, d),
            'ffn_down': (d, d_mlp), 'attn_norm': (d,), 'ffn_norm': (d,)}
  for i in range(n_layers):
    for name, shape in shapes.items():
      w[f'{i}.{name}'] = rng.normal(size=shape).astype(np.float32) * (0.2 if len(shape) == 2 else 1.0)
  return w


def gguf_held(weights):
  """The weights as `write_tiny_gguf` stores them: embed in F16, ffn_up in Q8_0."""
  out = dict(weights)
  out['embed'] = weights['embed'].astype(np.float16).astype(np.float32)
  q8 = gguf_lib.GGMLQuantizationType.Q8_0
  for key in weights:
    if key.endswith('.ffn_up'):
      out[key] = gguf_lib.quants.dequantize(gguf_lib.quants.quantize(weights[key], q8), q8)
  return out


def write_tiny_gguf(path, rng, n_layers=2, d=32, heads=4, kv_heads=2, d_mlp=48):
  """A tiny Llama GGUF (untied, F16 embeddings, one Q8_0 tensor); returns its weights."""
  hf = random_weights(rng, n_layers, d, heads, kv_heads, d_mlp)
  w = gguf_lib.GGUFWriter(str(path), 'llama')
  w.add_name('tiny')
  w.add_block_count(n_layers)
  w.add_context_length(128)
  w.add_embedding_length(d)
  w.add_feed_forward_length(d_mlp)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_rope_freq_base(500.0)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('gpt2')
  w.add_token_list(TOKENS)
  w.add_token_merges(MERGES)
  w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
  w.add_bos_token_id(0)
  w.add_eos_token_id(2)
  w.add_chat_template(CHAT_TEMPLATE)
  w.add_tensor('token_embd.weight', hf['embed'].astype(np.float16))  # F16 path
  w.add_tensor('output.weight', hf['unembed'].astype(np.float32))  # untied
  w.add_tensor('output_norm.weight', hf['final_norm'].astype(np.float32))
  for i in range(n_layers):
    for name in HF_NAMES:
      a = hf[f'{i}.{name}']
      if name in ('attn_q', 'attn_k'):  # as llama.cpp's converter writes them
        a = gguf.hf_to_llamacpp_rows(a, heads if name == 'attn_q' else kv_heads)
      if name == 'ffn_up':  # a quantised tensor: Q8_0 blocks of 32 along the rows
        w.add_tensor(f'blk.{i}.{name}.weight',
                     gguf_lib.quants.quantize(a, gguf_lib.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf_lib.GGMLQuantizationType.Q8_0)
      else:
        w.add_tensor(f'blk.{i}.{name}.weight', a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf


def write_tokenizer(directory):
  """tokenizer.json (the GGUF's byte-level BPE) and tokenizer_config.json."""
  tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(TOKENS)},
                                        merges=[tuple(m.split(' ')) for m in MERGES]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in SPECIALS])
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<|endoftext|>', 'eos_token': {'content': '<|im_end|>'},
               'chat_template': CHAT_TEMPLATE}, f)


def write_tiny_hf(directory, weights, *, heads=4, kv_heads=2, model_type='llama', tie=False,
                  biases=None, shards=1, dtype=np.float32, **config):
  """A Hugging Face model directory of `weights` (see `random_weights`).

  Args:
    directory: created if needed.
    weights: from `random_weights` (or `gguf_held`).
    heads, kv_heads: attention heads.
    model_type: config.json's model_type.
    tie: tie the embeddings (no lm_head.weight).
    biases: optional {'{layer}.{q,k,v}': vector}, written as q/k/v_proj.bias.
    shards: weights split over this many files with model.safetensors.index.json.
    dtype: stored dtype.
    **config: config.json fields added or overridden.
  """
  os.makedirs(directory, exist_ok=True)
  n_layers = 1 + max(int(k.split('.')[0]) for k in weights if k[0].isdigit())
  vocab, d = weights['embed'].shape
  tensors = {'model.embed_tokens.weight': weights['embed'], 'model.norm.weight': weights['final_norm']}
  if not tie:
    tensors['lm_head.weight'] = weights['unembed']
  for i in range(n_layers):
    for name, hf_name in HF_NAMES.items():
      tensors[f'model.layers.{i}.{hf_name}'] = weights[f'{i}.{name}']
  for key, b in (biases or {}).items():
    layer, which = key.split('.')
    tensors[f'model.layers.{layer}.self_attn.{which}_proj.bias'] = b
  tensors = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()}
  if shards == 1:
    safetensors.numpy.save_file(tensors, os.path.join(directory, 'model.safetensors'))
  else:
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
      file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
      part = {n: tensors[n] for n in names[s::shards]}
      safetensors.numpy.save_file(part, os.path.join(directory, file))
      weight_map.update({n: file for n in part})
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  cfg = {'architectures': ['LlamaForCausalLM'], 'model_type': model_type, 'hidden_size': d,
         'intermediate_size': weights['0.ffn_gate'].shape[0], 'num_hidden_layers': n_layers,
         'num_attention_heads': heads, 'num_key_value_heads': kv_heads, 'vocab_size': vocab,
         'max_position_embeddings': 128, 'rms_norm_eps': 1e-6, 'rope_theta': 500.0,
         'hidden_act': 'silu', 'tie_word_embeddings': tie, 'bos_token_id': 0, 'eos_token_id': 2,
         **config}
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  write_tokenizer(directory)
  return directory
