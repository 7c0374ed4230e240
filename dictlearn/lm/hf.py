"""Llama-family models from a local Hugging Face directory (config.json, safetensors, tokenizer).

    cfg, params, tokenizer = load_hf('/models/SmolLM2-135M')

A directory as `huggingface-cli download ID --local-dir DIR` or
`save_pretrained` leaves it: `config.json`, the weights as `model.safetensors`
or as shards listed in `model.safetensors.index.json`, and `tokenizer.json`
(with `tokenizer_config.json` for the special tokens and the chat template).

Supported (`config.json`'s model_type): 'llama' (Llama 2 and 3, SmolLM2, ...),
'mistral' and 'qwen2' (query, key and value biases). Hugging Face checkpoints
hold q_proj and k_proj in the half-split rotary layout the JAX model uses, so
unlike GGUF no rows are permuted. Refused, with the reason: rope scaling
(Llama 3.1's 'llama3', linear, dynamic, yarn, ...), partial rotary dimensions,
an activation other than SiLU, MLP biases, an output-projection bias (Llama's
attention_bias), quantised checkpoints, and PyTorch .bin weights. A sliding
window (Mistral v0.1: 4096 tokens) caps the context length instead: up to the
window, sliding-window attention is plain causal attention.
"""
import logging
import os
from typing import Optional

import jax.numpy as jnp
import safetensors

from dictlearn.lm import weights
from dictlearn.lm.llama import LlamaConfig
from dictlearn.lm.tokenizer import Tokenizer, read_json

log = logging.getLogger(__name__)

CONFIG = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja')
MODEL_TYPES = ('llama', 'mistral', 'qwen2')

# Hugging Face block tensor name (after 'model.layers.{i}.') -> params key.
_BLOCK_TENSORS = {
    'input_layernorm.weight': 'attn_norm', 'self_attn.q_proj.weight': 'wq',
    'self_attn.k_proj.weight': 'wk', 'self_attn.v_proj.weight': 'wv',
    'self_attn.o_proj.weight': 'wo', 'self_attn.q_proj.bias': 'bq', 'self_attn.k_proj.bias': 'bk',
    'self_attn.v_proj.bias': 'bv', 'post_attention_layernorm.weight': 'mlp_norm',
    'mlp.gate_proj.weight': 'w_gate', 'mlp.up_proj.weight': 'w_up',
    'mlp.down_proj.weight': 'w_down'}
_HF_NAME = {key: name for name, key in _BLOCK_TENSORS.items()}
_GLOBAL_NAMES = {'embed': 'model.embed_tokens.weight', 'final_norm': 'model.norm.weight',
                 'unembed': 'lm_head.weight'}
_GLOBAL_KEYS = {name: key for key, name in _GLOBAL_NAMES.items()}


def is_hf_dir(path: str) -> bool:
  """Whether `path` is a directory holding a config.json."""
  return os.path.isfile(os.path.join(path, CONFIG))


# ---- config ---------------------------------------------------------------------------


def _refuse(path: str, what: str):
  raise ValueError(f'{path}: {what}; dictlearn runs Llama-family models without it '
                   f'(supported model_type: {list(MODEL_TYPES)}).')


def _rope_theta(config: dict, path: str) -> float:
  """rope_theta, refusing any rope scaling (transformers 4 and 5 spellings)."""
  for key in ('rope_scaling', 'rope_parameters'):
    rope = config.get(key)
    if rope is None:
      continue
    if not isinstance(rope, dict):
      _refuse(path, f'{key} {rope!r} is not a mapping')
    kind = rope.get('rope_type', rope.get('type', 'default'))
    if kind != 'default':
      _refuse(path, f'{key} of type {kind!r} (rotary scaling) is not implemented')
    if 'rope_theta' in rope:
      return float(rope['rope_theta'])
  return float(config.get('rope_theta', 10000.0))


def config_from_hf(config: dict, path: str) -> LlamaConfig:
  """LlamaConfig from a parsed config.json.

  Args:
    config: the parsed config.json.
    path: where it came from, for messages.

  Raises:
    ValueError: a model type or feature this port does not implement (the
      message names it), or a missing field.
  """
  model_type = config.get('model_type')
  if model_type not in MODEL_TYPES:
    _refuse(path, f'model_type {model_type!r} (architectures {config.get("architectures")}) is '
            'not a Llama-family model')
  if config.get('quantization_config'):
    _refuse(path, f"quantised weights ({config['quantization_config'].get('quant_method')!r})")
  if config.get('hidden_act', 'silu') != 'silu':
    _refuse(path, f"hidden_act {config['hidden_act']!r} (the gated MLP here uses SiLU)")
  if config.get('mlp_bias'):
    _refuse(path, 'mlp_bias (biases in the MLP)')
  if model_type == 'llama' and config.get('attention_bias'):
    _refuse(path, 'attention_bias (Llama puts a bias on o_proj too; only q/k/v biases, as '
            'Qwen2 has, are implemented)')
  if config.get('partial_rotary_factor', 1.0) != 1.0:
    _refuse(path, f"partial_rotary_factor {config['partial_rotary_factor']} (partial rotary "
            'embeddings)')
  try:
    n_heads = int(config['num_attention_heads'])
    d_model = int(config['hidden_size'])
    context = int(config['max_position_embeddings'])
    fields = dict(n_layers=int(config['num_hidden_layers']), d_model=d_model, n_heads=n_heads,
                  d_mlp=int(config['intermediate_size']), vocab_size=int(config['vocab_size']))
  except KeyError as e:
    raise ValueError(f'{path}: config.json lacks {e.args[0]!r}.') from None
  window = config.get('sliding_window')
  if window and (model_type == 'mistral' or config.get('use_sliding_window')) and window < context:
    log.info('%s: sliding window of %d tokens; context length capped to it (up to the window, '
             'sliding-window attention is causal attention)', path, window)
    context = int(window)
  return LlamaConfig(
      n_kv_heads=int(config.get('num_key_value_heads') or n_heads),
      head_dim=int(config.get('head_dim') or d_model // n_heads),
      rope_base=_rope_theta(config, path),
      rms_eps=float(config.get('rms_norm_eps', 1e-6)),
      context_length=context,
      # transformers' default is True, but every supported model type defaults it to False.
      tie_embeddings=bool(config.get('tie_word_embeddings', False)),
      name=str(config.get('_name_or_path') or os.path.basename(os.path.dirname(path))),
      **fields)


def read_config(directory: str) -> tuple[dict, LlamaConfig]:
  """(the parsed config.json, its LlamaConfig).

  Raises:
    FileNotFoundError: no config.json in `directory`.
    ValueError: see `config_from_hf`.
  """
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory!r} has no {CONFIG}: expected a Hugging Face model '
                            f'directory (config.json, *.safetensors, tokenizer.json).')
  config = read_json(path)
  return config, config_from_hf(config, path)


# ---- weights --------------------------------------------------------------------------


def weight_files(directory: str) -> list[str]:
  """The safetensors files holding the model's weights (shards in index order).

  Raises:
    FileNotFoundError: neither an index nor model.safetensors, or a shard the
      index names is missing; the message lists what the directory holds.
  """
  index = os.path.join(directory, INDEX)
  if os.path.isfile(index):
    weight_map = read_json(index).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f'{index!r} has no weight_map of tensor name -> shard file.')
    files = [os.path.join(directory, f) for f in dict.fromkeys(weight_map.values())]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise FileNotFoundError(f'{index!r} names shards that are not there: {missing[:4]}.')
    return files
  single = os.path.join(directory, SINGLE_FILE)
  if os.path.isfile(single):
    return [single]
  present = sorted(os.listdir(directory))
  hint = (' PyTorch .bin weights are not read (dictlearn has no torch); save the model with '
          'safe_serialization=True.' if any(f.endswith('.bin') for f in present) else '')
  raise FileNotFoundError(f'{directory!r} has neither {SINGLE_FILE} nor {INDEX}; it holds '
                          f'{present[:12]}.{hint}')


def model_files(directory: str) -> list[str]:
  """Every file the model is read from: config, weights, tokenizer (those present)."""
  extra = [os.path.join(directory, f) for f in (INDEX,) + TOKENIZER_FILES]
  return ([os.path.join(directory, CONFIG)] + weight_files(directory)
          + [f for f in extra if os.path.isfile(f)])


def _tensors(files: list[str]):
  """(name, numpy array) of every tensor in the safetensors files."""
  for path in files:
    with safetensors.safe_open(path, framework='numpy') as f:
      for name in f.keys():
        yield path, name, f.get_tensor(name)


def load_params(directory: str, cfg: LlamaConfig, dtype=jnp.float32) -> dict:
  """The parameters of a Hugging Face Llama-family checkpoint, stacked by layer.

  Args:
    directory: the model directory.
    cfg: its config (`read_config`).
    dtype: dtype of the returned arrays.

  Returns:
    The parameter tree described in `dictlearn.lm.llama` (with bq/bk/bv when the
    checkpoint has attention biases).

  Raises:
    ValueError: a tensor is missing, unexpected or of the wrong shape.
  """
  keys = weights.BLOCK_KEYS + weights.BIAS_KEYS
  per_layer = {key: [None] * cfg.n_layers for key in keys}
  params = {}
  for path, name, w in _tensors(weight_files(directory)):
    full = name if name.startswith(('model.', 'lm_head.')) else 'model.' + name
    parts = full.split('.', 3)
    if full in _GLOBAL_KEYS:
      params[_GLOBAL_KEYS[full]] = w.T if full == 'lm_head.weight' else w
    elif full.endswith('rotary_emb.inv_freq'):
      continue  # a buffer older transformers saved; recomputed from rope_theta
    elif (len(parts) == 4 and parts[1] == 'layers' and parts[2].isdigit()
          and parts[3] in _BLOCK_TENSORS and int(parts[2]) < cfg.n_layers):
      key = _BLOCK_TENSORS[parts[3]]
      per_layer[key][int(parts[2])] = weights.to_model_layout(w, weights.KIND[key], cfg, name)
    else:
      raise ValueError(f'{path!r}: unexpected tensor {name!r} (shape {w.shape}); this loader '
                       'supports Llama blocks, with q/k/v biases at most.')
  if cfg.tie_embeddings:
    params.pop('unembed', None)  # some tied checkpoints still store lm_head: the same matrix
  return weights.assemble(
      params, per_layer, cfg, _GLOBAL_NAMES,
      lambda key, i: f'model.layers.{i}.{_HF_NAME[key]}', directory, dtype)


def load_hf(directory: str, dtype=jnp.float32, *,
            with_tokenizer: bool = True) -> tuple[LlamaConfig, dict, Optional[Tokenizer]]:
  """Loads a Llama-family model from a Hugging Face directory: config, parameters, tokenizer.

  Args:
    directory: holds config.json, the safetensors weights and tokenizer.json.
    dtype: parameter dtype (float32 default; bfloat16 on request).
    with_tokenizer: load tokenizer.json (None if False).

  Returns:
    (cfg, params, tokenizer).

  Raises:
    FileNotFoundError: a file is missing (the message says which).
    ValueError: the model is not a supported Llama-family model, or its
      weights do not match its config.
  """
  directory = os.fspath(directory)
  config, cfg = read_config(directory)
  params = load_params(directory, cfg, dtype)
  tokenizer = Tokenizer.from_hf_dir(directory, config) if with_tokenizer else None
  log.info('Loaded %s from %s: %d layers, d_model %d, vocab %d%s, %s.', cfg.name, directory,
           cfg.n_layers, cfg.d_model, cfg.vocab_size,
           ', attention biases' if 'bq' in params['layers'] else '', jnp.dtype(dtype).name)
  return cfg, params, tokenizer
