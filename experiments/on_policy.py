"""On-policy recognition: is SmolLM2 surer of its own replies than of another writer's?

For 16 chat prompts, the model reads four replies in the assistant turn: three of
its own (sampled at temperature 1, its true distribution; sampled at 0.8 with
top-p 0.95, the chat setting of the `generated` corpus; greedy) and a reply
written by hand for this file (another source, off-policy). At each reply
token the entropy of the model's next-token distribution is measured; each
prompt's replies are cut to a common length (the shortest of the four, at most
`max_tokens`) so that position in the reply weighs the same for every source.
Reported: mean entropy (nats) and mean negative log-likelihood per source, the
entropy ratio off-policy / on-policy, for how many prompts the off-policy reply
has the higher mean entropy, and NLL minus entropy (zero in expectation on the
model's own temperature-1 samples, whatever their entropy).

    python -m dictlearn.analysis.reproduce --config experiments/on_policy.py --out runs/on_policy

Hardware and time: 2 CPU cores; the first run generates the 48 model replies (up
to 96 tokens) and caches them, about 2 minutes on a quiet machine; the
measurement itself takes seconds. Expected: see README.md, "On-policy
recognition" (the model's own replies have markedly lower entropy).

Variants: `:tiny` (what the tests run: 2 prompts, 8-token replies).
"""
import ml_collections

from experiments import _sampling

# (user prompt, a reply written by hand: another source than the model).
PROMPTS_AND_REPLIES = (
    ('What is the capital of Australia?',
     "Australia's capital is Canberra, not Sydney as many people guess. The city was chosen in "
     '1908 as a compromise between Sydney and Melbourne, and it was planned from scratch by the '
     'American architects Walter Burley Griffin and Marion Mahony Griffin. Parliament has met '
     'there since 1927.'),
    ('Give me three tips for sleeping better.',
     'First, keep a fixed wake-up time, even at weekends; your body clock settles around it. '
     'Second, dim the lights and put the phone away for the last hour before bed. Third, cut '
     'caffeine after lunch, since its effect lasts far longer than most people think.'),
    ('Why is the sky blue?',
     'Sunlight contains every colour, but air molecules scatter short wavelengths much more '
     'strongly than long ones (Rayleigh scattering goes as one over the fourth power of the '
     'wavelength). Blue light is bounced around the whole sky, so it reaches your eyes from '
     'every direction, while the red and yellow mostly travel straight on.'),
    ('How do I boil an egg so the yolk is still runny?',
     'Bring a pot of water to a rolling boil, lower the egg in gently with a spoon and set a '
     'timer for six minutes. Then move it straight into a bowl of cold water for a minute to '
     'stop the cooking. Tap the shell all over and peel it under a trickle of water.'),
    ('What does a compiler do?',
     'A compiler translates a program written in a language people can read, such as C or Rust, '
     'into machine code the processor can run. Along the way it checks the program for errors, '
     'works out the types of values, and rearranges the code so that it runs faster without '
     'changing what it does.'),
    ('Write a haiku about rain.',
     'Grey roofs drum softly,\nthe gutter hums its one song,\nsparrows wait it out.'),
    ('Can you explain what a mortgage is?',
     'A mortgage is a loan for buying property, where the property itself is the security. You '
     'borrow most of the price from a bank and repay it, with interest, in monthly instalments '
     'over twenty or thirty years. If you stop paying, the lender can take the house and sell it '
     'to recover the money.'),
    ('What should I pack for a weekend hiking trip?',
     'Pack layers rather than one heavy coat, a waterproof jacket, good socks and broken-in '
     'boots. Bring more water than you think you need, snacks that do not crush, a map even if '
     'you have a phone, a small first-aid kit, a head torch and a warm hat for the evenings.'),
    ('Who was Marie Curie?',
     'Marie Curie was a Polish-born physicist and chemist who worked in France. With her '
     'husband Pierre she discovered polonium and radium, and she coined the word radioactivity. '
     'She was the first woman to win a Nobel Prize and remains the only person to win Nobel '
     'Prizes in two different sciences, physics and chemistry.'),
    ('How can I make my code easier to read?',
     'Give things names that say what they hold, keep functions short enough to see at once, '
     'and write comments that explain why rather than what. Be consistent with formatting, '
     'delete dead code instead of commenting it out, and ask a colleague to read it: whatever '
     'confuses them is worth fixing.'),
    ('What causes earthquakes?',
     "Most earthquakes happen where the plates of the Earth's crust meet. The plates creep past "
     'each other, but friction locks their edges, so strain builds up in the rock for years. '
     'When the rock finally gives way it slips suddenly, and the stored energy spreads out as '
     'seismic waves that shake the ground.'),
    ('Tell me a fun fact about octopuses.',
     'An octopus has three hearts and blue blood. Two of the hearts pump blood through the '
     'gills, and the third sends it round the rest of the body; oddly, that third heart stops '
     'beating while the octopus swims, which is one reason they prefer crawling.'),
    ('How do I politely decline an invitation?',
     'Thank them warmly first, then say clearly that you cannot make it, without a long '
     'excuse. Something like: "Thank you so much for thinking of me. I am afraid I cannot come '
     'on Saturday, but I hope it is a lovely evening." If you mean it, suggest another time to '
     'meet.'),
    ('What is the difference between a crocodile and an alligator?',
     'Alligators have a wide, U-shaped snout, and when their mouth is closed the lower teeth are '
     'hidden. Crocodiles have a narrower, V-shaped snout and their lower teeth show. Alligators '
     'live mostly in fresh water in the United States and China; crocodiles are found across '
     'the tropics and tolerate salt water.'),
    ('Suggest a name for a small bakery.',
     'How about "The Rising Crumb"? It is short, a little playful, and hints at bread without '
     'limiting you to it. Other options: "Flour and Ember", "Morning Loaf", or simply your own '
     'street name followed by "Bakehouse", which sounds local and trustworthy.'),
    ('Why do leaves change colour in autumn?',
     'Leaves are green because of chlorophyll, which the tree keeps rebuilding all summer. As '
     'days shorten, it stops, and the chlorophyll breaks down, uncovering yellow and orange '
     'pigments that were there all along. Some trees also make new red pigments, anthocyanins, '
     'from the sugars trapped in the leaf.'),
)


def get_config(arg=None):
  """The on-policy reproduction (locked); `arg` 'tiny' gives the test variant."""
  c = ml_collections.ConfigDict()
  c.experiment = 'on_policy'  # which reproduction `dictlearn.analysis.reproduce` runs
  c.model = ''  # GGUF model file; '' = SmolLM2-135M-Instruct from the cache
  c.prompts = tuple(p for p, _ in PROMPTS_AND_REPLIES)  # user prompts
  c.off_policy = tuple(r for _, r in PROMPTS_AND_REPLIES)  # another source's reply to each
  c.max_tokens = 64  # reply tokens compared at most per prompt (all sources cut alike)
  c.batch_size = 4  # sequences per forward pass (the logits are vocabulary-wide)
  c.cache_dir = ''  # cache of the model's replies; '' = $DICTLEARN_CACHE or ~/.cache/dictlearn

  # The model's own replies, one source per (temperature, top_p): its unfiltered
  # distribution, the chat sampling of the `generated` corpus, and greedy.
  c.on_policy = ((1.0, 1.0), (0.8, 0.95), (0.0, 1.0))
  # The rest of the replies' settings (temperature and top_p replaced by each on_policy entry).
  c.sampling = _sampling.sampling(96, temperature=1.0, top_p=1.0, batch_size=16)

  if arg == 'tiny':
    c.prompts = c.prompts[:2]
    c.off_policy = c.off_policy[:2]
    c.max_tokens = 8
    c.on_policy = ((1.0, 1.0), (0.0, 1.0))
    c.sampling.max_new_tokens = 8
    c.sampling.batch_size = 2
  elif arg not in (None, ''):
    raise ValueError(f"experiments/on_policy.py: unknown variant {arg!r}; expected '' or 'tiny'")
  c.lock()
  return c
