"""Llama-architecture weights and tokenizer from a GGUF file.

The `gguf` package reads the file and dequantises every tensor to float32
(Q4_1, Q8_0, Q6_K, F16, ... alike). Two things differ from the Hugging Face
layout the JAX model uses:

* GGUF writes tensor shapes innermost-first; `tensor.data` is already in numpy
  order, so a linear layer comes out as (out_features, in_features) and is
  transposed here to (in, out).
* llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`)
  reorders the rows of `attn_q` and `attn_k` inside each head from the
  half-split rotary layout to llama.cpp's interleaved one:
  (n_head, 2, head_dim/2, d) -> (n_head, head_dim/2, 2, d). Loading undoes it;
  without that the model still runs but is silently wrong (perplexity ~225
  instead of ~17 for SmolLM2-135M).
"""
import logging
import os
from typing import Any, Optional

import gguf
import jax.numpy as jnp
import numpy as np

from dictlearn.fetch import default_gguf_path
from dictlearn.lm import weights
from dictlearn.lm.llama import LlamaConfig
from dictlearn.lm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# GGUF block tensor name -> params key.
_BLOCK_TENSORS = {'attn_norm': 'attn_norm', 'attn_q': 'wq', 'attn_k': 'wk', 'attn_v': 'wv',
                  'attn_output': 'wo', 'ffn_norm': 'mlp_norm', 'ffn_gate': 'w_gate',
                  'ffn_up': 'w_up', 'ffn_down': 'w_down'}
_GGUF_NAME = {key: gguf_name for gguf_name, key in _BLOCK_TENSORS.items()}
_GLOBAL_NAMES = {'embed': 'token_embd.weight', 'final_norm': 'output_norm.weight',
                 'unembed': 'output.weight'}
_GLOBAL_KEYS = {name: key for key, name in _GLOBAL_NAMES.items()}


def open_gguf(path: Optional[str] = None) -> gguf.GGUFReader:
  """Opens a GGUF file (default: `default_gguf_path()`), memory-mapped.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not a readable GGUF file.
  """
  path = default_gguf_path() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file not found: {path!r} (expected a .gguf model file).')
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise ValueError(f'Cannot read {path!r} as a GGUF file: {e}') from e


def metadata(reader: gguf.GGUFReader, key: str, default: Any = KeyError) -> Any:
  """The value of one metadata key, as a Python scalar, string or list."""
  field = reader.fields.get(key)
  if field is None:
    if default is KeyError:
      raise KeyError(f'GGUF metadata key {key!r} missing from {reader.data.filename!r}.')
    return default
  return field.contents()


def config_from_gguf(reader: gguf.GGUFReader) -> LlamaConfig:
  """LlamaConfig from the `llama.*` metadata keys of a GGUF file.

  Raises:
    ValueError: the file is not a Llama-architecture model, or uses a feature
      this port does not implement (rope scaling, partial rotary dimensions).
  """
  path = reader.data.filename
  arch = metadata(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f'{path!r} holds a {arch!r} model; only general.architecture '
                     f"'llama' is supported.")
  a = arch + '.'
  n_heads = int(metadata(reader, a + 'attention.head_count'))
  d_model = int(metadata(reader, a + 'embedding_length'))
  head_dim = int(metadata(reader, a + 'attention.key_length', d_model // n_heads))
  rope_dims = int(metadata(reader, a + 'rope.dimension_count', head_dim))
  if rope_dims != head_dim:
    raise ValueError(f'{path!r}: rope.dimension_count {rope_dims} != head_dim {head_dim}; '
                     'partial rotary embeddings are not supported.')
  tensor_names = {t.name for t in reader.tensors}
  scaling = metadata(reader, a + 'rope.scaling.type', 'none')
  if scaling not in ('none', '') or 'rope_freqs.weight' in tensor_names:
    raise ValueError(f'{path!r} uses rope scaling ({scaling!r}); not supported.')
  vocab = metadata(reader, a + 'vocab_size', None)
  if vocab is None:
    vocab = next(t.data.shape[0] for t in reader.tensors if t.name == 'token_embd.weight')
  return LlamaConfig(
      n_layers=int(metadata(reader, a + 'block_count')),
      d_model=d_model,
      n_heads=n_heads,
      n_kv_heads=int(metadata(reader, a + 'attention.head_count_kv', n_heads)),
      head_dim=head_dim,
      d_mlp=int(metadata(reader, a + 'feed_forward_length')),
      vocab_size=int(vocab),
      rope_base=float(metadata(reader, a + 'rope.freq_base', 10000.0)),
      rms_eps=float(metadata(reader, a + 'attention.layer_norm_rms_epsilon')),
      context_length=int(metadata(reader, a + 'context_length')),
      tie_embeddings='output.weight' not in tensor_names,
      name=str(metadata(reader, 'general.name', os.path.basename(path))),
  )


# ---- rotary layout ----------------------------------------------------------------


def llamacpp_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation of an (n_heads * head_dim, d) matrix."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_llamacpp_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (convert_hf_to_gguf `LlamaModel.permute`)."""
  rows = w.shape[0]
  return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_rope_permute(params: dict) -> dict:
  """Params with wq/wk put back in llama.cpp's interleaved rotary order.

  What loading without undoing the permutation would give: a model that runs
  but is wrong. Kept to show (in tests) that the permutation matters.
  """
  def permute(w):  # (..., heads, head_dim): head_dim (2, hd/2) -> (hd/2, 2)
    hd = w.shape[-1]
    return w.reshape(*w.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(w.shape)

  layers = dict(params['layers'], wq=permute(params['layers']['wq']),
                wk=permute(params['layers']['wk']))
  return dict(params, layers=layers)


# ---- weights --------------------------------------------------------------------------


def _dequantize(tensor) -> np.ndarray:
  w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  return np.asarray(w, dtype=np.float32)


def load_params(reader: gguf.GGUFReader, cfg: LlamaConfig, dtype=jnp.float32,
                undo_rope_permutation: bool = True) -> dict:
  """Dequantised, stacked parameters of a Llama GGUF file.

  Args:
    reader: an open GGUF file.
    cfg: its config (`config_from_gguf`).
    dtype: dtype of the returned arrays (float32, or bfloat16 to halve memory).
    undo_rope_permutation: undo llama.cpp's Q/K row permutation; False only to
      show what goes wrong without it.

  Returns:
    The parameter tree described in `dictlearn.lm.llama`.

  Raises:
    ValueError: a tensor is missing, unexpected or of the wrong shape.
  """
  path = reader.data.filename
  per_layer = {key: [None] * cfg.n_layers for key in weights.BLOCK_KEYS}
  params = {}
  for tensor in reader.tensors:
    name, parts = tensor.name, tensor.name.split('.')
    if name in _GLOBAL_KEYS:
      w = _dequantize(tensor)
      params[_GLOBAL_KEYS[name]] = w.T if name == 'output.weight' else w
    elif (len(parts) == 4 and parts[0] == 'blk' and parts[3] == 'weight'
          and parts[2] in _BLOCK_TENSORS and int(parts[1]) < cfg.n_layers):
      key = _BLOCK_TENSORS[parts[2]]
      w = _dequantize(tensor)
      if undo_rope_permutation and key in ('wq', 'wk'):
        w = llamacpp_to_hf_rows(w, cfg.n_heads if key == 'wq' else cfg.n_kv_heads)
      per_layer[key][int(parts[1])] = weights.to_model_layout(w, weights.KIND[key], cfg, name)
    else:
      raise ValueError(f'{path!r}: unexpected tensor {name!r} (shape {tensor.data.shape}); '
                       'this loader supports plain Llama blocks without biases.')
  return weights.assemble(
      params, per_layer, cfg, _GLOBAL_NAMES, lambda key, i: f'blk.{i}.{_GGUF_NAME[key]}.weight',
      path, dtype)


def load_gguf(path: Optional[str] = None, dtype=jnp.float32, *,
              undo_rope_permutation: bool = True,
              with_tokenizer: bool = True) -> tuple[LlamaConfig, dict, Optional[Tokenizer]]:
  """Loads a Llama-architecture GGUF model: config, parameters and tokenizer.

  Args:
    path: the .gguf file; default `default_gguf_path()` (SmolLM2-135M-Instruct).
    dtype: parameter dtype (float32 default; bfloat16 on request).
    undo_rope_permutation: see `load_params`.
    with_tokenizer: build the tokenizer from the file's metadata (None if False).

  Returns:
    (cfg, params, tokenizer).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not a supported Llama model.
  """
  reader = open_gguf(path)
  cfg = config_from_gguf(reader)
  params = load_params(reader, cfg, dtype, undo_rope_permutation)
  tokenizer = Tokenizer.from_gguf(reader) if with_tokenizer else None
  log.info('Loaded %s from %s: %d layers, d_model %d, vocab %d, %s.', cfg.name,
           reader.data.filename, cfg.n_layers, cfg.d_model, cfg.vocab_size, jnp.dtype(dtype).name)
  return cfg, params, tokenizer
