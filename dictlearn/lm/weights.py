"""From a checkpoint's tensors to the parameter tree of `dictlearn.lm.llama`.

Both loaders (`gguf.py`, `hf.py`) hand over each linear layer as PyTorch stores
it, an (out_features, in_features) matrix, with query and key rows in the
Hugging Face half-split rotary layout; this module checks its shape against the
config, puts it in the model's layout, and stacks the layers.
"""
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from dictlearn.lm.llama import LlamaConfig

# Per-layer parameters every Llama block has, and the optional attention biases.
BLOCK_KEYS = ('attn_norm', 'wq', 'wk', 'wv', 'wo', 'mlp_norm', 'w_gate', 'w_up', 'w_down')
BIAS_KEYS = ('bq', 'bk', 'bv')
# What each per-layer parameter is (how `to_model_layout` checks and reshapes it).
KIND = {'attn_norm': 'vector', 'wq': 'q', 'wk': 'kv', 'wv': 'kv', 'wo': 'o', 'mlp_norm': 'vector',
        'w_gate': 'mlp_in', 'w_up': 'mlp_in', 'w_down': 'mlp_out', 'bq': 'q_bias',
        'bk': 'kv_bias', 'bv': 'kv_bias'}


def expected_shape(kind: str, cfg: LlamaConfig) -> tuple[int, ...]:
  """The checkpoint shape of a tensor of `kind` (see `to_model_layout`)."""
  d, hd, f = cfg.d_model, cfg.head_dim, cfg.d_mlp
  return {
      'vector': (d,),
      'q': (cfg.n_heads * hd, d),
      'kv': (cfg.n_kv_heads * hd, d),
      'o': (d, cfg.n_heads * hd),
      'mlp_in': (f, d),
      'mlp_out': (d, f),
      'q_bias': (cfg.n_heads * hd,),
      'kv_bias': (cfg.n_kv_heads * hd,),
  }[kind]


def to_model_layout(w: np.ndarray, kind: str, cfg: LlamaConfig, name: str) -> np.ndarray:
  """One checkpoint tensor in the model's layout.

  Args:
    w: the tensor as stored: (out, in) for a matrix.
    kind: 'vector' (a norm weight), 'q', 'kv', 'o' (attention projections),
      'mlp_in' (gate, up), 'mlp_out' (down), 'q_bias', 'kv_bias'.
    cfg: the model's config, for the expected shapes.
    name: the tensor's name in the checkpoint, for messages.

  Raises:
    ValueError: the shape is not what the config implies.
  """
  expected = expected_shape(kind, cfg)
  if w.shape != expected:
    raise ValueError(f'tensor {name!r} has shape {w.shape}; expected {expected} from the '
                     "model's config")
  d, hd = cfg.d_model, cfg.head_dim
  if kind in ('q', 'kv'):
    return w.T.reshape(d, -1, hd)
  if kind == 'o':
    return w.T.reshape(cfg.n_heads, hd, d)
  if kind in ('q_bias', 'kv_bias'):
    return w.reshape(-1, hd)
  if kind in ('mlp_in', 'mlp_out'):
    return w.T
  return w


def assemble(params: Mapping[str, np.ndarray], per_layer: Mapping[str, list], cfg: LlamaConfig,
             names: Mapping[str, str], layer_name: Callable[[str, int], str], source: str,
             dtype) -> dict:
  """The parameter tree of `dictlearn.lm.llama`, checked, stacked and in `dtype`.

  Args:
    params: 'embed' (vocab, d_model), 'final_norm', and 'unembed' (d_model,
      vocab) when the embeddings are not tied.
    per_layer: {key: [layer 0, layer 1, ...]} in the model's layout (None where
      the checkpoint had no tensor); BIAS_KEYS are optional, all layers or none.
    cfg: the model's config.
    names: the checkpoint's names of 'embed', 'final_norm' and 'unembed'.
    layer_name: (key, layer) -> the checkpoint's name of a per-layer tensor.
    source: the checkpoint's path, for messages.
    dtype: dtype of the returned arrays.

  Raises:
    ValueError: a tensor is missing or of the wrong shape; the message names it.
  """
  required = ('embed', 'final_norm') + (() if cfg.tie_embeddings else ('unembed',))
  missing = [names[k] for k in required if k not in params]
  per_layer = {key: ws for key, ws in per_layer.items()
               if key in BLOCK_KEYS or any(w is not None for w in ws)}
  missing += [layer_name(key, i) for key, ws in per_layer.items()
              for i, w in enumerate(ws) if w is None]
  if missing:
    raise ValueError(f'{source!r} lacks tensors {missing[:8]}{" ..." if len(missing) > 8 else ""}.')
  shapes = {'embed': (cfg.vocab_size, cfg.d_model), 'final_norm': (cfg.d_model,),
            'unembed': (cfg.d_model, cfg.vocab_size)}
  for key in required:
    if params[key].shape != shapes[key]:
      shape = params[key].shape if key != 'unembed' else params[key].shape[::-1]
      expected = shapes[key] if key != 'unembed' else shapes[key][::-1]
      raise ValueError(f'{source!r}: {names[key]} has shape {shape}; expected {expected}.')
  tree = {key: params[key] for key in required}
  tree['layers'] = {key: np.stack(ws) for key, ws in per_layer.items()}
  return to_jax(tree, dtype)


def to_jax(tree, dtype):
  """Every array of a nested dict as a jax array of `dtype`."""
  if isinstance(tree, dict):
    return {k: to_jax(v, dtype) for k, v in tree.items()}
  return jnp.asarray(tree, dtype=dtype)
