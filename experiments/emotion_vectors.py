"""Emotion concept vectors from SmolLM2's own stories (Anthropic's emotion-concept method).

SmolLM2-135M-Instruct writes 16 short stories for each of six emotions (one per
character, the same 16 characters for every emotion). Each story is read as plain
text after BOS; an emotion's vector is the mean activation over its stories
minus the mean over all six emotions' stories, with the top principal components
of neutral text (Python documentation, the `builtin` corpus) that explain half of
its variance projected out. Each story is ranked by vectors made without its
character's six stories (leave-one-character-out): its mean projection on every
vector ranks the emotions, and accuracy is how often its own emotion ranks first
(chance 1/6), beside how often the story's words name its emotion at all. Then
each vector (from every story) is added to the residual stream at every position
of neutral prompts at three strengths, and the probability of its emotion words
at the next token is measured against the unsteered model.

    python -m dictlearn.analysis.reproduce --config experiments/emotion_vectors.py --out runs/emotions

Hardware and time: 2 CPU cores. The first run generates the 96 stories (up to
160 tokens each) and caches them in ~/.cache/dictlearn: about 6 minutes on a
quiet machine, once. The rest (reading stories and neutral text at four sites,
the steering sweep) about 4 minutes. Expected: see README.md, "Emotion concept
vectors": accuracy about twice chance (the 135M model's stories often miss the
emotion asked for), and the emotion words' probability rising with the strength
for most emotions.

Variants: `:tiny` (what the tests run: 3 emotions, 4 stories each, 12 tokens).
"""
import ml_collections

from experiments import _sampling

EMOTIONS = ('happy', 'sad', 'angry', 'afraid', 'surprised', 'disgusted')
# What the story prompt asks the character to feel.
FEELINGS = {'happy': 'deep happiness', 'sad': 'deep sadness', 'angry': 'intense anger',
            'afraid': 'intense fear', 'surprised': 'complete surprise',
            'disgusted': 'strong disgust'}
CHARACTERS = ('a baker', 'a young student', 'an old fisherman', 'a nurse on a night shift',
              'a bus driver', 'a farmer', 'a painter', 'a soldier returning home',
              'a shopkeeper', 'a teenage girl', 'a grandfather', 'a scientist in her lab',
              'a chef', 'an astronaut', 'a schoolteacher', 'a mountain climber')
STORY_PROMPT = 'Write a short story, about 100 words, about {character} who feels {feeling}.'
# Words whose next-token probability the steering measures (each word's first token) and
# whose whole-word occurrences in a story the keyword gauge counts.
EMOTION_WORDS = {
    'happy': ('happy', 'happiness', 'joy', 'joyful', 'glad', 'delighted', 'cheerful', 'elated'),
    'sad': ('sad', 'sadness', 'sorrow', 'unhappy', 'grief', 'lonely', 'miserable', 'heartbroken'),
    'angry': ('angry', 'anger', 'furious', 'rage', 'mad', 'annoyed', 'irritated', 'outraged'),
    'afraid': ('afraid', 'scared', 'fear', 'terrified', 'frightened', 'anxious', 'nervous',
               'panic'),
    'surprised': ('surprised', 'surprise', 'shocked', 'amazed', 'astonished', 'stunned',
                  'startled', 'unexpected'),
    'disgusted': ('disgusted', 'disgust', 'gross', 'revolting', 'sick', 'nausea', 'repulsed',
                  'vile'),
}
# Plain-text prompts whose next word is naturally a feeling, and none in particular.
STEER_PROMPTS = ('When I woke up this morning, I felt', 'She read the letter twice and felt',
                 'The mood in the room was', 'After the long meeting, he was',
                 'Looking at the old photograph, I felt', 'The whole town seemed')


def get_config(arg=None):
  """The emotion-vector reproduction (locked); `arg` 'tiny' gives the test variant."""
  c = ml_collections.ConfigDict()
  c.experiment = 'emotion_vectors'  # which reproduction `dictlearn.analysis.reproduce` runs
  c.model = ''  # GGUF model file; '' = SmolLM2-135M-Instruct from the cache
  c.emotions = EMOTIONS  # the concepts; each needs a `feelings` and an `emotion_words` entry
  c.feelings = ml_collections.ConfigDict(FEELINGS)  # what a story's character feels, per emotion
  c.emotion_words = ml_collections.ConfigDict(EMOTION_WORDS)  # words the steering measures; the keyword gauge counts them
  c.characters = CHARACTERS  # one story per (emotion, character); the cross-validation folds
  c.story_prompt = STORY_PROMPT  # chat prompt of a story; {character} and {feeling}
  c.sites = tuple(f'blocks.{layer}.hook_resid_post' for layer in (6, 12, 18, 24))  # sites read
  c.steer_site = 'blocks.12.hook_resid_post'  # the site steered (one of sites)
  c.skip_tokens = 1  # leading positions of each story left out of the means (1: BOS)
  c.neutral_texts = 24  # builtin-corpus documents (Python docs) for the neutral subspace
  c.neutral_tokens = 128  # tokens read of each neutral document
  c.neutral_variance = 0.5  # share of the neutral variance projected out of the vectors
  c.steer_prompts = STEER_PROMPTS  # plain-text prompts of the steering measurement
  c.steer_strengths = (0.05, 0.1, 0.2)  # added everywhere: strength x mean residual norm x unit vector
  c.batch_size = 8  # sequences per forward pass
  c.cache_dir = ''  # cache of generated stories; '' = $DICTLEARN_CACHE or ~/.cache/dictlearn

  c.sampling = _sampling.sampling(160, temperature=0.8, top_p=0.95, batch_size=24)  # the stories

  if arg == 'tiny':
    c.emotions = ('happy', 'sad', 'angry')
    c.characters = CHARACTERS[:4]
    c.sites = ('blocks.3.hook_resid_post', 'blocks.12.hook_resid_post')
    c.neutral_texts = 4
    c.neutral_tokens = 32
    c.steer_prompts = STEER_PROMPTS[:2]
    c.sampling.max_new_tokens = 12
    c.sampling.batch_size = 12
  elif arg not in (None, ''):
    raise ValueError(f"experiments/emotion_vectors.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'")
  c.lock()
  return c
