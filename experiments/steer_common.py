"""Fields every steering reproduction shares (experiments/steer_*.py build on it)."""
import ml_collections


def get_config(arg=None):
  """The shared fields (locked); each reproduction adds its own. `arg` is unused."""
  del arg
  c = ml_collections.ConfigDict()
  c.experiment = ''  # which reproduction dictlearn.analysis.steer_experiments runs
  c.model = ''  # GGUF file of the language model ('' = SmolLM2-135M-Instruct from the cache)
  c.seed = 0  # sampling seed
  c.lock()
  return c
