"""Harvest SmolLM2-135M-Instruct's residual stream at block 12 over the built-in corpus.

    python -m dictlearn.harvest --config experiments/harvest_smollm2.py --out /tmp/dl_smollm2_l12

Hardware and time: 2 shared CPU cores (jax CPU), float32; measured 10.5 minutes.
The first run generates the model-written part of the corpus (64 prompts, up to
320 tokens each, about 18K tokens) and caches it in ~/.cache/dictlearn: about 8
minutes, once. The harvest then reads the whole corpus (79 Python documentation
topics and the 64 replies: 143 documents, 512 contexts of 256), stopping after
block 12, at about 2,100 tokens/s on a quiet machine (2,140 measured on the
built-in part alone in a fresh clone, 2026-12-02): about a minute; on a busy one,
several times that. Expected: one store
OUT/blocks.12.hook_resid_post of 130,305 rows x 576 float32 (290 MB; BOS rows
left out), mean row norm about 143, norm of the mean about 102. Killed at any
point, the same command resumes.

Variants:
    --config.corpus=builtin             only the Python documentation (no generation)
    --config.corpus=/data/texts         .txt/.jsonl files (see dictlearn.data.corpus)
    --config.sites="('blocks.6.hook_resid_post','blocks.24.hook_resid_post')"
    experiments/harvest_smollm2.py:tiny  what the tests run: 2 shallow sites, 2K tokens, seconds
"""
import ml_collections

from experiments import base


def get_config(arg=None):
  """The harvest config (locked); `arg` 'tiny' gives the test variant.

      python -m dictlearn.harvest --config experiments/harvest_smollm2.py --out DIR

  On 2 shared CPU cores: about 10.5 minutes the first time (8 of them generating
  the model-written corpus, cached once), about 2 minutes after; 130,305 rows.
  The 'tiny' variant: about 10 seconds, most of it loading the model.
  """
  c = ml_collections.ConfigDict()
  c.model = ''  # '' = SmolLM2-135M-Instruct (the cached GGUF), a .gguf file, or a Hugging Face dir
  c.dtype = 'float32'  # compute dtype of the language model: float32 or bfloat16
  c.sites = ('blocks.12.hook_resid_post',)  # TransformerLens hook sites, all read in one forward pass; one store each
  c.context_length = 256  # tokens per context, BOS included; at most the model's context length
  c.batch_size = 8  # contexts per forward pass
  c.token_budget = -1  # activation rows written per site; -1 = the whole corpus
  c.corpus = 'builtin+generated'  # 'builtin', 'generated', a .txt/.jsonl file or directory, or parts joined by '+'
  c.jsonl_field = 'text'  # field of each .jsonl line that holds the document's text
  c.exclude_bos = True  # leave BOS positions out of the stores (their activations are ~100x outliers)
  c.store_dtype = 'float32'  # stored activation dtype: float32 or bfloat16
  c.store_chunk_rows = 0  # rows per store read chunk; 0 = about 2 MiB of rows
  c.store_shard_chunks = 16  # read chunks per shard file; a store commits a whole shard at a time
  c.seed = 0  # seed of the sampled text of the 'generated' corpus part
  c.progress = True  # show a progress bar with tokens/s on stderr
  c.distributed = base.distributed_config()  # processes of a multi-host harvest (each forwards its own store shards)

  c.generate = ml_collections.ConfigDict()  # the 'generated' corpus part (ignored without it)
  c.generate.n_prompts = -1  # prompts of corpus.GENERATION_PROMPTS used, in order; -1 = all 64
  c.generate.max_new_tokens = 320  # tokens generated at most per prompt
  c.generate.temperature = 0.8  # sampling temperature; 0 = greedy
  c.generate.top_p = 0.95  # nucleus sampling mass (with temperature > 0)
  c.generate.batch_size = 16  # prompts generated together
  c.generate.cache_dir = ''  # cache of generated text; '' = $DICTLEARN_CACHE or ~/.cache/dictlearn

  if arg == 'tiny':
    c.sites = ('blocks.0.hook_resid_post', 'blocks.1.hook_mlp_out')
    c.context_length = 64
    c.batch_size = 4
    c.token_budget = 2000
    c.corpus = 'builtin'
    c.store_chunk_rows = 64
    c.store_shard_chunks = 2
    c.progress = False
  elif arg not in (None, ''):
    raise ValueError(f'experiments/harvest_smollm2.py: unknown variant {arg!r}; '
                     "expected '' or 'tiny'")
  c.lock()
  return c
