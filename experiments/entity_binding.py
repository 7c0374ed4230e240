"""Entity binding in SmolLM2: probes for the current, the prior and a queried entity's attribute.

400 templated stories ("Alice is tall. Bob is short. Carol is happy. Dave is
sad. Bob is"), four entities each, attributes drawn at random; each token is
labelled with the current sentence's attribute, the previous sentence's, and
(at the final " is") the re-mentioned entity's (see dictlearn/analysis/binding.py).
A logistic probe per label and site is trained on 75% of the stories and scored on
the other 25%; chance is about 1/4.

    python -m dictlearn.analysis.reproduce --config experiments/entity_binding.py --out runs/binding

Hardware and time: 2 CPU cores; reading 400 stories (about 8,000 tokens) at 16
sites and training 48 probes: about 2 minutes on a quiet machine. Expected: see
README.md, "Entity binding" (current: near 1 at every layer; prior: high from
the early layers on; queried: rises in the middle layers).

Variants: `:tiny` (what the tests run: 48 stories, 3 sites, short training).
"""
import ml_collections

NAMES = ('Alice', 'Bob', 'Carol', 'Dave', 'Emma', 'Frank', 'Grace', 'Henry', 'Ivy', 'Jack',
         'Kate', 'Leo', 'Mia', 'Noah', 'Olivia', 'Paul')
ATTRIBUTES = ('tall', 'short', 'happy', 'sad')


def get_config(arg=None):
  """The entity-binding reproduction (locked); `arg` 'tiny' gives the test variant."""
  c = ml_collections.ConfigDict()
  c.experiment = 'entity_binding'  # which reproduction `dictlearn.analysis.reproduce` runs
  c.model = ''  # GGUF model file; '' = SmolLM2-135M-Instruct from the cache
  c.names = NAMES  # entity names (each story draws n_entities distinct ones)
  c.attributes = ATTRIBUTES  # attribute words: the probes' classes
  c.n_stories = 400  # templated stories
  c.n_entities = 4  # sentences (entities) per story
  c.seed = 0  # seed of the stories, the held-out split and the probes' initialisation
  c.sites = ('hook_embed',) + tuple(f'blocks.{layer}.hook_resid_post'
                                    for layer in (*range(0, 30, 2), 29))  # sites probed
  c.test_fraction = 0.25  # share of stories held out
  c.probe_steps = 300  # full-batch Adam steps per probe
  c.learning_rate = 1e-2  # Adam step size
  c.l2 = 1e-3  # squared-weight penalty
  c.batch_size = 16  # stories per forward pass

  if arg == 'tiny':
    c.n_stories = 48
    c.sites = ('hook_embed', 'blocks.4.hook_resid_post', 'blocks.12.hook_resid_post')
    c.probe_steps = 100
  elif arg not in (None, ''):
    raise ValueError(f"experiments/entity_binding.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'")
  c.lock()
  return c
