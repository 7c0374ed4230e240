"""The `sampling` block of the configs whose texts the model writes (dictlearn.analysis.texts)."""
import ml_collections


def sampling(max_new_tokens, *, temperature, top_p, batch_size, seed=0):
  """How model-written texts are generated; every field enters their cache key."""
  c = ml_collections.ConfigDict()
  c.max_new_tokens = max_new_tokens  # tokens per text at most
  c.temperature = temperature  # sampling temperature; 0 = greedy
  c.top_p = top_p  # nucleus mass (with temperature > 0)
  c.batch_size = batch_size  # texts generated together
  c.seed = seed  # base seed (batch i: seed + i)
  return c
