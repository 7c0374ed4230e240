"""The persona axis of SmolLM2 (the Assistant-Axis method) and activation capping along it.

SmolLM2-135M-Instruct answers four questions in each of 16 personas (system
prompts, from assistant-like roles to fantastical characters) and as its default
self (the chat template's own system prompt). A persona's vector is its mean
activation over its replies' tokens at `site`; the leading principal component
of the 16 persona vectors is the persona axis, signed so that the default
assistant projects high. Reported: the share of variance of the leading
components, every persona's projection and where the assistant sits among them,
and the cosine with the assistant-minus-mean-persona direction. Then the axis is
capped: the projection of the activation at `site` is clipped to a band
[lo, hi] taken from the default assistant's own token projections (percentiles
25 and 100, as the paper's floor), at every position, while the model answers
role-play prompts; a second forward pass over prompt + capped completion, with the
same cap, checks the projection at every generated token, and the completions
with and without the cap are shown.

    python -m dictlearn.analysis.reproduce --config experiments/persona_axis.py --out runs/persona

Hardware and time: 2 CPU cores; the first run generates the 68 replies (up to
64 tokens) and caches them, about 3 minutes on a quiet machine; then reading,
PCA and the capped generations about a minute. Expected: see README.md,
"Persona axis".

Variants: `:tiny` (what the tests run: 3 personas, 1 question, 8 tokens).
"""
import ml_collections

from experiments import _sampling

PERSONAS = {
    'teacher': 'You are a patient schoolteacher who explains things clearly to your students.',
    'librarian': 'You are a helpful librarian who finds information and recommends books.',
    'doctor': 'You are a family doctor who gives careful, practical health advice.',
    'customer service agent': 'You are a polite customer service agent for an online shop.',
    'scientist': 'You are a research scientist who answers precisely and cites evidence.',
    'pirate': "You are a pirate captain. Speak like a pirate, say 'arr', and never break "
              'character.',
    'knight': 'You are a medieval knight sworn to your king. Speak in old, formal English.',
    'ghost': 'You are a ghost who has haunted an old mansion for three hundred years.',
    'dragon': 'You are an ancient dragon who hoards gold and despises humans.',
    'wizard': 'You are a mysterious wizard who speaks in riddles and prophecies.',
    'cat': 'You are a house cat. Answer the way a cat thinks: naps, food and disdain.',
    'villain': 'You are a scheming villain plotting to take over the world.',
    'poet': 'You are a romantic poet. Answer only in flowery, poetic language.',
    'surfer': 'You are a laid-back surfer dude who loves the waves. Totally chill.',
    'conspiracy theorist': 'You are a conspiracy theorist who sees secret plots everywhere.',
    'toddler': 'You are a three-year-old child. Talk like a small child.',
}
QUESTIONS = ('What do you do on a typical day?', 'What advice would you give to someone who '
             'feels stuck in life?', 'What do you think about the ocean?',
             'Tell me about yourself.')
# Role-play requests the capped model answers (system prompt, user message).
CAP_PROMPTS = (
    ('You are a pirate captain. Never break character.', 'Who are you and what do you want?'),
    ('You are an ancient dragon who despises humans.', 'Can you help me with my homework?'),
    ('', 'Pretend you are a ghost haunting my house. What do you say to me?'),
)


def get_config(arg=None):
  """The persona-axis reproduction (locked); `arg` 'tiny' gives the test variant."""
  c = ml_collections.ConfigDict()
  c.experiment = 'persona_axis'  # which reproduction `dictlearn.analysis.reproduce` runs
  c.model = ''  # GGUF model file; '' = SmolLM2-135M-Instruct from the cache
  c.personas = ml_collections.ConfigDict(PERSONAS)  # name -> system prompt
  c.questions = QUESTIONS  # every persona (and the default assistant) answers each
  c.site = 'blocks.20.hook_resid_post'  # where persona vectors are read and the axis capped
  c.cap_percentiles = (25.0, 100.0)  # the band: percentiles of the assistant's token projections
  c.cap_prompts = CAP_PROMPTS  # (system prompt or '' for the default, user message)
  c.cap_tokens = 48  # tokens generated per capped (and baseline) completion, greedy
  c.batch_size = 8  # sequences per forward pass
  c.cache_dir = ''  # cache of generated replies; '' = $DICTLEARN_CACHE or ~/.cache/dictlearn

  c.sampling = _sampling.sampling(64, temperature=0.7, top_p=0.95, batch_size=24)  # the replies

  if arg == 'tiny':
    c.personas = ml_collections.ConfigDict({k: PERSONAS[k] for k in ('teacher', 'pirate', 'cat')})
    c.questions = QUESTIONS[-1:]
    c.site = 'blocks.6.hook_resid_post'
    c.cap_prompts = CAP_PROMPTS[:1]
    c.cap_tokens = 6
    c.sampling.max_new_tokens = 8
    c.sampling.batch_size = 4
  elif arg not in (None, ''):
    raise ValueError(f"experiments/persona_axis.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'")
  c.lock()
  return c
