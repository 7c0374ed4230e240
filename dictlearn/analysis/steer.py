"""Steer a model from the command line: baseline and steered completions side by side.

    python -m dictlearn.analysis.steer --workdir runs/smollm2 --feature 123 --scale 4 \\
        --prompt "Tell me about your weekend."
    python -m dictlearn.analysis.steer --vector love.safetensors --coefficient 6 --prompt "I think"
    python -m dictlearn.analysis.steer --cap=-5,3 --direction axis.safetensors --prompt "..."

Features: `--feature I[,J...]` of the SAE in `--workdir`, clamped to `--scale`
times each feature's max activation (`--max_activation`, or measured on the
first `--stat_rows` rows of the run's activation store), or to `--value` (the
SAE's units), or pushed along its decoder direction with `--add C`. Vectors and
directions come from vector files (`dictlearn.analysis.vectors_io`); a vector
of n rows (ActAdd) goes to the first n positions. Every intervention acts on
`--positions` (all, prompt, generated) and they compose. Each prompt is
completed greedily and sampled (`--temperature`, `--seed`), without and with
the interventions.
"""
import argparse
import functools
import logging
import sys
import textwrap
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import harvest
from dictlearn.analysis import steering
from dictlearn.analysis import vectors_io
from dictlearn.data import store as store_lib
from dictlearn.lm import generate as gen
from dictlearn.lm import gguf as gguf_lib
from dictlearn.lm import llama

_ROWS_PER_CALL = 1024


@functools.partial(jax.jit, static_argnums=0)
def _chunk_max(sae, params, buffers, x):
  return jnp.max(sae.encode(params, buffers, x), axis=0)


def max_activations(sae: steering.SaeAtSite, store_path: str, n_rows: int = -1) -> np.ndarray:
  """Each feature's largest activation (SAE units) over the first `n_rows` rows of a store.

  A stand-in for the per-latent statistics of `dictlearn.analysis.features`.

  Args:
    sae: the SAE.
    store_path: the activation store it was trained on.
    n_rows: rows read from the start (-1: all).

  Raises:
    ValueError: n_rows is 0 or below -1.
  """
  if n_rows == 0 or n_rows < -1:
    raise ValueError(f'max_activations needs n_rows >= 1 or -1 (all), got {n_rows}.')
  reader = store_lib.StoreReader(store_path, d_model=sae.sae.d_model)
  n_rows = reader.n_rows if n_rows == -1 else n_rows
  best = np.zeros(sae.n_latents, np.float32)
  for start in range(0, min(n_rows, reader.n_rows), _ROWS_PER_CALL):
    rows = np.asarray(reader.read_rows(start, min(start + _ROWS_PER_CALL, n_rows,
                                                  reader.n_rows)), np.float32)
    best = np.maximum(best, np.asarray(_chunk_max(sae.sae, sae.params, sae.buffers,
                                                  jnp.asarray(rows) * sae.data_scale)))
  return best


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


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m dictlearn.analysis.steer', description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog='\n'.join(
          __doc__.splitlines()[2:]))
  parser.add_argument('--prompt', action='append', required=True,
                      help='a prompt (repeat for several)')
  parser.add_argument('--raw', action='store_true',
                      help='plain-text prompts (default: a user turn of the chat template)')
  parser.add_argument('--model', default=None,
                      help="GGUF file (default: the SAE run's model, else SmolLM2-135M-Instruct)")
  feature = parser.add_argument_group('SAE features')
  feature.add_argument('--workdir', help='SAE training workdir (or a pipeline workdir)')
  feature.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
  feature.add_argument('--site', default=None,
                       help="the SAE's hook site (default: its activation store's)")
  feature.add_argument('--feature', type=_parse_features, help='feature index(es) I[,J...]')
  how = feature.add_mutually_exclusive_group()
  how.add_argument('--scale', type=float, help="clamp to this multiple of the max activation")
  how.add_argument('--value', type=float, help="clamp to this value (the SAE's units)")
  how.add_argument('--add', type=float, help='add this many units of the decoder direction')
  feature.add_argument('--max_activation', type=float, action='append',
                       help='max activation of each feature (default: measured on the store)')
  feature.add_argument('--stat_rows', type=int, default=16384,
                       help='store rows to measure max activations on')
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
          measured = max_activations(sae, args.store, args.stat_rows)
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


def _check_args(parser, args):
  if args.feature is not None:
    if not args.workdir:
      parser.error('--feature needs --workdir (the SAE training run).')
    if args.scale is None and args.value is None and args.add is None:
      parser.error('--feature needs one of --scale, --value or --add.')
  elif args.workdir and not (args.vector or args.cap or args.ablate):
    parser.error('--workdir given without --feature: say which feature to steer.')
  if (args.cap or args.ablate) and not args.direction:
    parser.error('--cap and --ablate need --direction FILE (a vector file).')
  if args.direction and not (args.cap or args.ablate):
    parser.error('--direction needs --cap LO,HI or --ablate.')
  if args.feature is None and not args.vector and not (args.cap or args.ablate):
    parser.error('nothing to steer with: give --feature, --vector, --cap or --ablate.')


def main(argv=None, model=None) -> int:
  """The command; `model` is an already loaded (cfg, params, tokenizer) to skip loading one."""
  parser = build_parser()
  args = parser.parse_args(argv)
  _check_args(parser, args)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax's notes on read-only checkpoints
  try:
    sae, model_path = None, args.model
    if args.workdir:
      run = steering.load_sae_run(args.workdir, args.step, site=args.site)
      sae, args.store = run.sae, run.store
      sae.check_features(np.asarray(args.feature))  # before a model is loaded
      if model_path is None and model is None:
        model_path = harvest.resolve_model_path(run.model)
    if model is None:
      model_path = model_path or gguf_lib.default_gguf_path()
      model = gguf_lib.load_gguf(model_path)
    cfg, params, tokenizer = model
    identity = vectors_io.model_identity(cfg, model_path)
    interventions, lines = build_interventions(args, cfg, identity, sae)
    prompts = encode_prompts(tokenizer, args.prompt, chat=not args.raw)
    results = compare(params, cfg, tokenizer, prompts, interventions,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      seed=args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print('\n'.join(['steering: ' + line for line in lines]))
  for text, result in zip(args.prompt, results):
    print(f'\n=== {text}')
    for mode, note in (('greedy', 'greedy'), ('sampled', f'sampled, T={args.temperature}, '
                                                         f'seed {args.seed}')):
      print(side_by_side(f'baseline ({note})', result[f'baseline_{mode}'], f'steered ({note})',
                         result[f'steered_{mode}'], args.width))
      print()
  return 0


if __name__ == '__main__':
  sys.exit(main())
