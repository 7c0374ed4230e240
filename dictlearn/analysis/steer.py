"""Steer a model from the command line: baseline and steered completions side by side.

    python -m dictlearn.analysis.steer --workdir runs/smollm2 --feature 3534 --scale 3 \\
        --prompt "Tell me about your weekend."
    python -m dictlearn.analysis.steer --vector love.safetensors --coefficient 6 --prompt "I think"
    python -m dictlearn.analysis.steer --cap=-5,3 --direction axis.safetensors --prompt "..."

Features: `--feature I[,J...]` of the SAE in `--workdir`, clamped to `--scale`
times each feature's max activation (from the run's feature statistics,
`python -m dictlearn.analysis.features --workdir DIR`, or `--max_activation`),
or to `--value` (the SAE's units), or pushed along its decoder direction with
`--add C`. Vectors and directions come from vector files
(`dictlearn.analysis.vectors_io`); a vector of n rows (ActAdd) goes to the
first n positions. Every intervention acts on `--positions` (all, prompt,
generated) and they compose. Each prompt is completed greedily and sampled
(`--temperature`, `--seed`), without and with the interventions; the baseline
is the steered program with the interventions switched off.
"""
import argparse
import sys
import textwrap
from typing import Optional, Sequence

import numpy as np

from dictlearn import cli
from dictlearn import lm
from dictlearn.analysis import statistics
from dictlearn.analysis import steering
from dictlearn.analysis import vectors_io
from dictlearn.lm import generate as gen
from dictlearn.lm import llama

def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
  """Token ids of each prompt, as a user turn of a chat (`chat`) or as plain text."""
  if chat:
    return [tokenizer.encode_chat([{'role': 'user', 'content': p}]) for p in prompts]
  return [tokenizer.encode(p) for p in prompts]


def compare(params, cfg, tokenizer, prompts: Sequence[Sequence[int]],
            interventions: Sequence[llama.Patch], *, max_new_tokens: int, temperature: float,
            seed: int) -> list[dict]:
  """Greedy and sampled completions of each prompt, without and with `interventions`.

  Returns:
    One dict per prompt: {'baseline_greedy', 'steered_greedy', 'baseline_sampled',
    'steered_sampled'} (decoded text).
  """
  runs = {}
  for mode, sampling in (('greedy', {}), ('sampled', {'temperature': temperature,
                                                      'seed': seed})):
    # The baseline runs the steered program with every intervention switched off: one
    # compilation per mode, and the same logits as the plain model bit for bit.
    for name, chosen in (('baseline', steering.switched_off(interventions)),
                         ('steered', interventions)):
      out = gen.generate(params, cfg, prompts, max_new_tokens=max_new_tokens,
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                         interventions=chosen, **sampling)
      runs[f'{name}_{mode}'] = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out]
  return [{key: texts[i] for key, texts in runs.items()} for i in range(len(prompts))]


def side_by_side(left_title: str, left: str, right_title: str, right: str,
                 width: int = 48) -> str:
  """Two texts in columns of `width` characters under their titles."""
  columns = [[title, '-' * width] + textwrap.wrap(text.replace('\n', ' / '), width)
             for title, text in ((left_title, left), (right_title, right))]
  depth = max(map(len, columns))
  rows = [(columns[0] + [''] * depth)[i].ljust(width) + ' | ' + (columns[1] + [''] * depth)[i]
          for i in range(depth)]
  return '\n'.join(row.rstrip() for row in rows)


# ---- the command -------------------------------------------------------------------


def _parse_band(text: str) -> tuple[float, float]:
  parts = text.split(',')
  if len(parts) != 2:
    raise argparse.ArgumentTypeError(f'--cap takes LO,HI (either may be empty for no bound), '
                                     f'got {text!r}')
  try:
    return (float(parts[0]) if parts[0].strip() else -np.inf,
            float(parts[1]) if parts[1].strip() else np.inf)
  except ValueError:
    raise argparse.ArgumentTypeError(f'--cap takes two numbers LO,HI, got {text!r}') from None


def _parse_features(text: str) -> list[int]:
  try:
    return [int(part) for part in text.split(',')]
  except ValueError:
    raise argparse.ArgumentTypeError(f'--feature takes integers I[,J...], got {text!r}') from None


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m dictlearn.analysis.steer', description=__doc__)
  parser.add_argument('--prompt', action='append', required=True,
                      help='a prompt (repeat for several)')
  parser.add_argument('--raw', action='store_true',
                      help='plain-text prompts (default: a user turn of the chat template)')
  parser.add_argument('--model', default=None,
                      help="GGUF file or Hugging Face directory (default: the model the SAE's "
                      'store was harvested from, else SmolLM2-135M-Instruct)')
  feature = parser.add_argument_group('SAE features')
  feature.add_argument('--workdir', help='SAE training workdir (or a pipeline workdir)')
  feature.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
  feature.add_argument('--store', default=None,
                       help="the SAE's activation store where it is now, if it moved")
  feature.add_argument('--feature', type=_parse_features, help='feature index(es) I[,J...]')
  how = feature.add_mutually_exclusive_group()
  how.add_argument('--scale', type=float, help="clamp to this multiple of the max activation")
  how.add_argument('--value', type=float, help="clamp to this value (the SAE's units)")
  how.add_argument('--add', type=float, help='add this many units of the decoder direction')
  feature.add_argument('--max_activation', type=float, action='append',
                       help="max activation of each feature (default: the run's feature "
                       'statistics)')
  vector = parser.add_argument_group('vectors and directions (vector files)')
  vector.add_argument('--vector', help='vector file to add')
  vector.add_argument('--coefficient', type=float, default=4.0, help='multiple of --vector added')
  vector.add_argument('--cap', type=_parse_band, help='LO,HI band for the projection on '
                      '--direction (write --cap=-5,3 when LO is negative)')
  vector.add_argument('--ablate', action='store_true', help='remove --direction')
  vector.add_argument('--direction', help='vector file of the direction for --cap / --ablate')
  vector.add_argument('--name', default=None, help='which vector of a file holding several')
  parser.add_argument('--positions', choices=steering.SPANS, default='all',
                      help='positions the interventions act on')
  parser.add_argument('--max_new_tokens', type=int, default=48)
  parser.add_argument('--temperature', type=float, default=0.8, help='of the sampled completions')
  parser.add_argument('--seed', type=int, default=0, help='of the sampled completions')
  parser.add_argument('--width', type=int, default=48, help='column width of the output')
  return parser


def _pick(saved: vectors_io.SavedVectors, name: Optional[str], path: str) -> np.ndarray:
  if name is None:
    if len(saved.vectors) != 1:
      raise ValueError(f'{path} holds {len(saved.vectors)} vectors {sorted(saved.vectors)}; '
                       'choose one with --name.')
    return next(iter(saved.vectors.values()))
  if name not in saved.vectors:
    raise ValueError(f'{path} has no vector {name!r}; it holds {sorted(saved.vectors)}.')
  return saved.vectors[name]


def build_interventions(args, cfg, identity: dict, sae: Optional[steering.SaeAtSite]
                        ) -> tuple[list, list[str]]:
  """The interventions the flags ask for, and a line describing each."""
  where = steering.span(args.positions)
  out, lines = [], []
  if args.feature is not None:
    if args.add is not None:
      for i in args.feature:
        out.append(steering.add_feature(sae, i, args.add, where))
      lines.append(f'add {args.add} x decoder direction of feature(s) {args.feature} at {sae.site}')
    else:
      if args.value is not None:
        values = [args.value] * len(args.feature)
      else:
        maxima = args.max_activation
        if maxima is None:
          measured = statistics.load_statistics(args.workdir).max_activation
          maxima = [float(measured[i]) for i in args.feature]
        elif len(maxima) != len(args.feature):
          raise ValueError(f'--max_activation given {len(maxima)} times for {len(args.feature)} '
                           'features; give one per feature.')
        values = [args.scale * m for m in maxima]
      skip = sae.skip_token if args.positions == 'all' else steering.NO_TOKEN
      out.append(steering.clamp(sae, args.feature, values, steering.span(
          args.positions, skip_token=skip)))
      lines.append(f'clamp feature(s) {args.feature} to {[round(v, 3) for v in values]} at '
                   f'{sae.site}')
  if args.vector:
    saved = vectors_io.load_vectors(args.vector, model=identity)
    vector = _pick(saved, args.name, args.vector)
    front = steering.front(vector.shape[0]) if vector.ndim == 2 else where
    out.append(steering.add(saved.site, vector, args.coefficient, front))
    lines.append(f'add {args.coefficient} x {args.vector} {vector.shape} at {saved.site}')
  if args.cap or args.ablate:
    saved = vectors_io.load_vectors(args.direction, model=identity)
    direction = _pick(saved, args.name, args.direction)
    if direction.ndim != 1:
      raise ValueError(f'the direction in {args.direction} has shape {direction.shape}; '
                       f'expected one vector ({cfg.d_model},).')
    if args.cap:
      out.append(steering.cap(saved.site, direction, *args.cap, where))
      lines.append(f'cap the projection on {args.direction} to {list(args.cap)} at {saved.site}')
    if args.ablate:
      out.append(steering.ablate(saved.site, direction, 1.0, where))
      lines.append(f'ablate {args.direction} at {saved.site}')
  return out, lines


def check_args(args) -> None:
  """Raises cli.UsageError for flags that do not go together."""
  if args.feature is not None:
    if not args.workdir:
      raise cli.UsageError('--feature needs --workdir (the SAE training run).')
    if args.scale is None and args.value is None and args.add is None:
      raise cli.UsageError('--feature needs one of --scale, --value or --add.')
  elif args.workdir and not (args.vector or args.cap or args.ablate):
    raise cli.UsageError('--workdir given without --feature: say which feature to steer.')
  if (args.cap or args.ablate) and not args.direction:
    raise cli.UsageError('--cap and --ablate need --direction FILE (a vector file).')
  if args.direction and not (args.cap or args.ablate):
    raise cli.UsageError('--direction needs --cap LO,HI or --ablate.')
  if args.feature is None and not args.vector and not (args.cap or args.ablate):
    raise cli.UsageError('nothing to steer with: give --feature, --vector, --cap or --ablate.')


def steer(args, model=None) -> int:
  """The command on parsed flags; `model` is an already loaded (cfg, params, tokenizer)."""
  sae, model_path = None, args.model
  if args.workdir:
    run = steering.load_sae_run(args.workdir, args.step, store=args.store)
    sae = run.sae
    sae.check_features(np.asarray(args.feature))  # before a model is loaded
    model_path = model_path or run.model
  model_path = lm.resolve_model(model_path or '')
  cfg, params, tokenizer = model or lm.load_model(model_path)
  interventions, lines = build_interventions(args, cfg, vectors_io.model_identity(cfg, model_path),
                                             sae)
  prompts = encode_prompts(tokenizer, args.prompt, chat=not args.raw)
  results = compare(params, cfg, tokenizer, prompts, interventions,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    seed=args.seed)
  print('\n'.join(['steering: ' + line for line in lines]))
  for text, result in zip(args.prompt, results):
    print(f'\n=== {text}')
    for mode, note in (('greedy', 'greedy'), ('sampled', f'sampled, T={args.temperature}, '
                                                         f'seed {args.seed}')):
      print(side_by_side(f'baseline ({note})', result[f'baseline_{mode}'], f'steered ({note})',
                         result[f'steered_{mode}'], args.width))
      print()
  return 0


def main(argv=None, model=None) -> int:
  """The command; `model` (cfg, params, tokenizer) skips loading one (tests, notebooks)."""

  def run(args):
    check_args(args)
    return steer(args, model)

  return cli.run_tool(run, build_parser(), argv)


if __name__ == '__main__':
  sys.exit(main())
