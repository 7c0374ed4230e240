"""One entry point for every model dictlearn runs: the bundled GGUF, a .gguf file, or a
Hugging Face directory.

    cfg, params, tokenizer = load_model('')                      # SmolLM2-135M-Instruct
    cfg, params, tokenizer = load_model('~/models/x.Q8_0.gguf')
    cfg, params, tokenizer = load_model('~/models/Qwen2.5-0.5B')  # config.json, safetensors

A harvest's `--config.model` takes the same strings. Nothing is downloaded: a
Hugging Face model id that is not a local directory is an error that says how
to download it once.
"""
import hashlib
import os
import re

import jax.numpy as jnp

from dictlearn import files
from dictlearn.fetch import default_gguf_path
from dictlearn.lm import gguf, hf
from dictlearn.lm.llama import LlamaConfig

# owner/name, as Hugging Face spells model ids.
_MODEL_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


def resolve_model(model: str) -> str:
  """The path a model string names: '' = the bundled SmolLM2 GGUF, a file, or a directory.

  Raises:
    FileNotFoundError: nothing at that path; for a Hugging Face model id, the
      message gives the command that downloads it and what to pass instead.
  """
  if not model:
    return default_gguf_path()
  path = os.path.expanduser(os.fspath(model))
  if os.path.isfile(path) or os.path.isdir(path):
    return path
  if _MODEL_ID.match(model):
    raise FileNotFoundError(
        f'model {model!r} is not a local file or directory. dictlearn reads models from disk '
        f'only: download it once with `huggingface-cli download {model} --local-dir '
        f'DIR` (or `hf download {model} --local-dir DIR`) and pass DIR (for a harvest, '
        '--config.model=DIR).')
  raise FileNotFoundError(f'model {model!r}: no file or directory at {path!r}; expected a '
                          ".gguf file, a Hugging Face model directory (config.json, "
                          "*.safetensors, tokenizer.json), or '' for SmolLM2-135M-Instruct.")


def load_config(path: str) -> LlamaConfig:
  """The config of the model at `path` (a resolved path), without reading its weights."""
  if os.path.isdir(path):
    return hf.read_config(path)[1]
  return gguf.config_from_gguf(gguf.open_gguf(path))


def load_model(model: str = '', dtype=jnp.float32, *, with_tokenizer: bool = True):
  """Loads config, parameters and tokenizer of the model `model` names (see `resolve_model`).

  Args:
    model: '' (SmolLM2-135M-Instruct), a .gguf file, or a Hugging Face directory.
    dtype: parameter dtype (float32 default; bfloat16 on request).
    with_tokenizer: also load the tokenizer (None if False).

  Returns:
    (LlamaConfig, params, Tokenizer or None), whatever the format.

  Raises:
    FileNotFoundError: see `resolve_model`, or a file missing from a directory.
    ValueError: not a supported Llama-family model (the message says why).
  """
  path = resolve_model(model)
  if os.path.isdir(path):
    return hf.load_hf(path, dtype, with_tokenizer=with_tokenizer)
  return gguf.load_gguf(path, dtype, with_tokenizer=with_tokenizer)


def model_files(path: str) -> list[str]:
  """The files a model is read from: the .gguf file, or a directory's config, weights, tokenizer."""
  return hf.model_files(path) if os.path.isdir(path) else [path]


def model_identity(path: str) -> dict:
  """{'file': name, 'bytes': size}: the file's (or directory's) name and the bytes read from it.

  A harvest records it and refuses to resume with another model.
  """
  name = os.path.basename(os.path.normpath(path))
  return {'file': name, 'bytes': sum(os.path.getsize(f) for f in model_files(path))}


def model_sha256(path: str) -> str:
  """SHA-256 of a model file; of a directory, over each file's name and SHA-256."""
  if not os.path.isdir(path):
    return files.sha256(path)
  lines = [f'{os.path.relpath(f, path)} {files.sha256(f)}\n' for f in model_files(path)]
  return hashlib.sha256(''.join(lines).encode()).hexdigest()
