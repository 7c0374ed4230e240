"""Language models for dictlearn: Llama-family models (GGUF files, Hugging Face directories) in JAX.

    from dictlearn import lm
    cfg, params, tokenizer = lm.load_model()         # SmolLM2-135M-Instruct (the bundled GGUF)
    cfg, params, tokenizer = lm.load_model('DIR')    # a Hugging Face directory, or a .gguf file
    logits, acts = lm.forward(params, cfg, tokens, read_sites=['blocks.12.hook_resid_post'])
    replies = lm.chat(params, cfg, tokenizer, 'What is the capital of France?')
"""
# The generation function stays at dictlearn.lm.generate.generate: re-exporting it here
# would hide the module of the same name.
from dictlearn.lm.generate import chat
from dictlearn.fetch import default_gguf_path
from dictlearn.lm.gguf import llamacpp_rope_permute, load_gguf
from dictlearn.lm.hf import load_hf
from dictlearn.lm.llama import (LlamaConfig, cross_entropy, forward, parse_site, perplexity,
                                valid_sites)
from dictlearn.lm.models import load_model, resolve_model
from dictlearn.lm.tokenizer import Tokenizer

__all__ = [
    'LlamaConfig', 'Tokenizer', 'chat', 'cross_entropy', 'default_gguf_path', 'forward',
    'llamacpp_rope_permute', 'load_gguf', 'load_hf', 'load_model', 'parse_site', 'perplexity',
    'resolve_model', 'valid_sites',
]
