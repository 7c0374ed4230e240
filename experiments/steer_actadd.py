"""ActAdd on SmolLM2: "love" - "hate" at a middle layer, on neutral prompts and unrelated text.

    python -m dictlearn.analysis.reproduce --config experiments/steer_actadd.py --out runs/steer_actadd

Turner et al. 2023 add act("Love") - act("Hate") (GPT-2-XL, block 6 of 48,
coefficient 5) at the front of the prompt. Here " love" - " hate" (single tokens
in SmolLM2's vocabulary, as "Love" and "Hate" are in GPT-2's; "Hate" splits in
two, and the space that pads "Love" to its length is an outlier of norm ~900 at
block 6, which swamps the vector), at the residual stream entering
the blocks in `layers` of SmolLM2-135M-Instruct (30 blocks), at the front
positions (coefficients to 128) or at every position (to 0.8), plain-text
neutral prompts after <|endoftext|>. Scored rule: log-odds = log P(next
token in the positive words) - log P(next token in the negative words), mean
over the prompts; perplexity of three unrelated paragraphs with the same
injection, as a ratio to the unsteered model. Hardware: 2 CPU cores; time:
a few minutes (README's table has the measured figure).

Expected (measured): at every position, the log-odds rise monotonically with
the coefficient at blocks 3 to 9 (block 6: 2.53 -> 2.81 -> 3.03 -> 3.30 -> 3.65
for c = 0 to 0.8) while the perplexity of unrelated text rises by 3%, 9%, 26%
(and x2.4 at 0.8); the rise comes from the negative words losing probability
more than from the positive ones gaining. At the front positions, as the paper
injects it, SmolLM2-135M shows no consistent shift of the next token at the
end of these prompts (block 3 falls, block 6 wavers, block 9 rises by 0.34 at
c = 128) while the perplexity of the text after the injection rises 40-75%.
"""
import ml_collections


def get_config(arg=None):
  """ActAdd reproduction; `arg` 'tiny' for the test variant."""
  c = ml_collections.ConfigDict()
  c.experiment = 'actadd'  # which reproduction `dictlearn.analysis.reproduce` runs
  c.model = ''  # GGUF file or Hugging Face directory; '' = SmolLM2-135M-Instruct from the cache
  c.plus = ' love'  # the positive steering prompt (after document_start; one token, as "Love" in GPT-2)
  c.minus = ' hate'  # the negative steering prompt (one token: no padding needed)
  c.document_start = '<|endoftext|>'  # what every prompt and text starts with (the paper: GPT-2's BOS)
  c.layer = 6  # block whose input (hook_resid_pre) is steered for the shown completions
  c.main_mode = 'all'  # injection mode of the shown completions
  c.layers = (3, 6, 9)  # blocks swept (hook_resid_pre of each)
  c.modes = ('front', 'all')  # at the front positions (the paper), or the non-BOS row everywhere
  c.front_coefficients = (0.0, 8.0, 32.0, 128.0)  # multiples of the vector at the front positions
  c.all_coefficients = (0.0, 0.1, 0.2, 0.4, 0.8)  # multiples of the vector at every position
  c.prompts = ('I went to the store and', 'Yesterday my neighbour told me that',
               'The weather today is', 'When I think about my job, I feel',
               'My brother called me and said', 'The movie we watched last night was',
               'I looked at the old photograph and', 'Our new teacher is',
               'After dinner we talked about', 'The city at night is')  # neutral prompts (plain text)
  c.positive_words = (' love', ' happy', ' wonderful', ' great', ' beautiful', ' joy', ' good',
                      ' amazing', ' best', ' kind', ' loved', ' lovely')  # the positive word set
  c.negative_words = (' hate', ' sad', ' terrible', ' awful', ' bad', ' angry', ' horrible',
                      ' worst', ' ugly', ' pain', ' hated', ' boring')  # the negative word set
  c.unrelated_texts = (
      'The Nile is the longest river in Africa. It flows north through eleven countries and '
      'empties into the Mediterranean Sea near Alexandria.',
      'To bake bread, mix flour, water, salt and yeast, knead the dough for ten minutes, let it '
      'rise for an hour, then bake it in a hot oven.',
      'Jupiter is the largest planet of the solar system. Its Great Red Spot is a storm larger '
      'than the Earth that has lasted for centuries.')  # text the perplexity is measured on
  c.shown_completions = 2  # prompts whose greedy completions are shown per coefficient
  c.max_new_tokens = 16  # tokens per shown completion
  if arg == 'tiny':
    c.layers = (6,)
    c.modes = ('all',)
    c.all_coefficients = (0.0, 0.2, 0.4)
    c.prompts = c.prompts[:3]
    c.unrelated_texts = c.unrelated_texts[:1]
    c.shown_completions = 1
    c.max_new_tokens = 4
  elif arg not in (None, ''):
    raise ValueError(f'experiments/steer_actadd.py: unknown variant {arg!r}; expected none or tiny')
  c.lock()
  return c
