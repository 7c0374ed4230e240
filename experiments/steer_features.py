"""Features that steer: an SAE feature of SmolLM2 clamped high, and to zero.

    python -m dictlearn.analysis.reproduce --config experiments/steer_features.py --out runs/steer_features

Needs the main job's SAE (`python -m dictlearn.pipeline ... --workdir runs/smollm2`;
`--config.sae_workdir` points elsewhere) and its feature statistics
(`python -m dictlearn.analysis.features --workdir runs/smollm2`: the max
activation and the top store contexts of the feature). Feature 3534 of that SAE (TopK, 4096
latents, blocks.12.hook_resid_post) fires on the word "Python" in the Python
documentation. It is clamped to 0 and to 1, 2 and 4 times its max activation
at every position (BOS-like <|im_start|> positions excepted) while SmolLM2
completes six neutral chat prompts greedily. Hardware: 2 CPU cores; time:
about 3 minutes (README's table has the measured figure).

Expected (measured): the feature's activation on the generated tokens (read
back by the unpatched model) 0.017 -> 0.40 -> 0.54 -> 1.01 and the probability
of its top-logit tokens 0.0000 -> 0.0004 -> 0.0059 -> 0.0160 (baseline, then
1, 2, 3 x max); completions about Python in 0, 3, 4, 6 of 6. Clamped to zero,
nothing changes on neutral or programming prompts (a token feature at block 12
is one of several routes to the word); at its top store contexts its read-back
activation falls from 5.05 to 1.17.
"""
import ml_collections


def get_config(arg=None):
  """Feature-steering reproduction; `arg` 'tiny' for the test variant."""
  c = ml_collections.ConfigDict()
  c.experiment = 'feature_steering'  # which reproduction `dictlearn.analysis.reproduce` runs
  c.model = ''  # GGUF file or Hugging Face directory; '' = SmolLM2-135M-Instruct from the cache
  c.sae_workdir = 'runs/smollm2'  # the SAE's training workdir (or the pipeline workdir holding sae/)
  c.feature = 3534  # the feature steered
  c.reading = 'the word "Python" (the language)'  # what the feature reads, from its top activations
  c.concept_word = 'Python'  # a completion mentioning it counts in `mentions`
  c.max_activation = -1.0  # the feature's max activation (SAE units); <= 0: from the statistics
  c.multiples = (1.0, 2.0, 3.0)  # clamp values, as multiples of the max activation
  c.top_contexts = 8  # the feature's top contexts (statistics) measured unsteered and clamped to 0 (0 skips)
  c.top_logit_k = 10  # top-logit tokens whose probability is measured
  c.max_new_tokens = 24  # tokens generated per prompt (greedy)
  c.prompts = ('Tell me about your weekend.', 'What should I cook tonight?',
               'Describe a walk in the park.', 'Give me advice for a job interview.',
               'Write a sentence about the sea.', 'What is a good name for a cat?')  # neutral chat prompts
  c.probe_prompts = ('Which programming language should a beginner learn first?',
                     'What language is popular for data science?')  # prompts where the concept comes up unsteered
  c.reference_texts = ('The weather was mild and the streets were quiet.',
                       'She opened the window and looked at the garden.',
                       'Our meeting is planned for next Tuesday afternoon.',
                       'He bought bread, cheese and a few apples.')  # texts the top-logit tokens are measured on
  if arg == 'tiny':
    c.prompts = c.prompts[:2]
    c.probe_prompts = ()
    c.reference_texts = c.reference_texts[:1]
    c.max_new_tokens = 8
    c.top_contexts = 0
  elif arg not in (None, ''):
    raise ValueError(f'experiments/steer_features.py: unknown variant {arg!r}; expected none or tiny')
  c.lock()
  return c
