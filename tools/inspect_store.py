"""Describe an activation store: manifest, layout, norm statistics, progress.

    python tools/inspect_store.py PATH [--sample_rows 8192] [--json] [--verify]

PATH is a local path or a file://, memory://, gs:// or s3:// URL. Works on
incomplete stores too (shows progress.json and the committed rows). Reads only
through `dictlearn.data.store`. The status line lists shard files the rows need
that are missing (a listing, no reads); `--verify` reads every chunk and checks
it against the manifest (present, readable, checksum where the store has one,
finite rows, recomputed statistics) and exits with status 1 if anything is wrong.
"""
import json
import os
import sys

import numpy as np
import tqdm

from dictlearn import cli
from dictlearn.data import store


def _bytes_on_disk(directory):
  total = 0
  for root, _, files in os.walk(directory):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _sample_stats(reader, sample_rows, seed):
  """Row-norm statistics measured on up to `sample_rows` random rows."""
  if reader.n_rows == 0:
    return None
  rng = np.random.default_rng(seed)
  n = min(sample_rows, reader.n_rows)
  idx = np.sort(rng.choice(reader.n_rows, size=n, replace=False))
  x = reader.read_indices(idx).astype(np.float64)
  norms = np.linalg.norm(x, axis=1)
  return {'rows': int(n), 'mean_norm': float(norms.mean()), 'std_norm': float(norms.std()),
          'min_norm': float(norms.min()), 'max_norm': float(norms.max()),
          'mean_sq_norm': float((norms ** 2).mean()),
          'norm_of_mean': float(np.linalg.norm(x.mean(axis=0)))}


def _column_presence(reader, sample):
  """For tokens/doc/pos: whether the first rows carry values (not -1)."""
  n = min(sample, reader.n_rows)
  reads = {'tokens': reader.read_tokens, 'doc': reader.read_doc, 'pos': reader.read_pos}
  return {name: bool(n and (read(0, n) != -1).any()) for name, read in reads.items()}


def describe(path, sample_rows=8192, seed=0):
  """Everything the tool shows, as a JSON-able dict."""
  reader = store.StoreReader(path, allow_incomplete=True)
  info = {'path': path, 'complete': reader.complete, 'n_rows': reader.n_rows,
          'd_model': reader.d_model, 'dtype': reader.dtype, 'layout': reader.layout()}
  if reader.complete:
    manifest = dict(reader.manifest)
    stats = dict(manifest.pop('statistics'))
    stats.pop('mean', None)  # d_model numbers: not for a terminal
    info['manifest'], info['manifest_statistics'] = manifest, stats
  else:
    progress = dict(reader.progress)
    progress['stats'] = {k: v for k, v in progress['stats'].items() if k != 'sum'}
    info['progress'] = progress
  info['missing_shard_files'] = [{'key': k, 'rows': r} for k, r in reader.missing_shard_files()]
  local = store.local_directory(path)
  if local is not None:
    info['bytes_on_disk'] = _bytes_on_disk(local)
  try:
    info['sample_statistics'] = _sample_stats(reader, sample_rows, seed)
  except (store.StoreReadError, store.NonFiniteRowsError) as e:
    info['sample_statistics'], info['sample_error'] = None, str(e)
  info['columns_present'] = _column_presence(reader, sample_rows)
  return info


def _print(info):
  print(f"store       {info['path']}")
  status = 'complete' if info['complete'] else 'INCOMPLETE (no manifest.json)'
  if info['missing_shard_files']:
    status = 'DAMAGED: shard files missing: ' + ', '.join(
        f"{m['key']} (rows [{m['rows'][0]}, {m['rows'][1]}))" for m in info['missing_shard_files'])
  print(f"status      {status}")
  print(f"rows        {info['n_rows']}   d_model {info['d_model']}   dtype {info['dtype']}")
  lay = info['layout']
  print(f"chunks      {lay['n_chunks']} of {lay['chunk_rows']} rows ({lay['chunk_bytes'] / 2**20:.2f} "
        f"MiB), {lay['shard_chunks']} per shard file; array shape {lay['array_shape']}")
  print(f"codec       {json.dumps(lay['codecs']['activations'])}")
  if 'bytes_on_disk' in info:
    print(f"on disk     {info['bytes_on_disk'] / 2**20:.1f} MiB")
  if info['complete']:
    print('manifest    ' + json.dumps(info['manifest'], indent=2, sort_keys=True)
          .replace('\n', '\n            '))
    print(f"statistics  (manifest) {json.dumps(info['manifest_statistics'])}")
  else:
    print('progress    ' + json.dumps(info['progress'], indent=2, sort_keys=True)
          .replace('\n', '\n            '))
  if info['sample_statistics']:
    print(f"statistics  (sample)   {json.dumps(info['sample_statistics'])}")
  if 'sample_error' in info:
    print(f"statistics  (sample)   unreadable: {info['sample_error']}")
  print(f"columns     {info['columns_present']} (present = not all -1 in the first rows)")


def _print_verification(report):
  print(f"verified    {report['n_rows']} rows in {report['n_chunks']} chunks of {report['path']} "
        f"(writer version {report['writer_version']})")
  for bad in report['bad_chunks']:
    print(f"  bad chunk {bad['array']} rows [{bad['rows'][0]}, {bad['rows'][1]}): {bad['error']}")
  if report['n_nonfinite_rows']:
    shown = ', '.join(map(str, report['nonfinite_rows'][:20]))
    print(f"  {report['n_nonfinite_rows']} rows hold NaN or Inf: {shown}"
          + (', ...' if report['n_nonfinite_rows'] > 20 else ''))
  stats = report['statistics']
  if stats is not None:
    print(f"  statistics {'match' if stats['match'] else 'DIFFER FROM'} the manifest: "
          f"recorded {json.dumps(stats['recorded'])}, recomputed {json.dumps(stats['recomputed'])}")
  print('  OK' if report['ok'] else '  FAILED')


def _verify(args) -> int:
  bar = tqdm.tqdm(unit='row', unit_scale=True, desc='verify', file=sys.stderr,
                  disable=args.json, dynamic_ncols=True)

  def progress(done, total):
    bar.total = total
    bar.update(done - bar.n)

  try:
    report = store.verify_store(args.path, progress=progress)
  finally:
    bar.close()
  if args.json:
    print(json.dumps(report, indent=1, sort_keys=True))
  else:
    _print_verification(report)
  if not report['ok']:
    problems = [f"{len(report['bad_chunks'])} bad chunk(s)"] if report['bad_chunks'] else []
    if report['n_nonfinite_rows']:
      problems.append(f"{report['n_nonfinite_rows']} non-finite row(s)")
    if report['statistics'] is not None and not report['statistics']['match']:
      problems.append('statistics differ from the manifest')
    raise store.StoreReadError(f"store at {args.path} failed verification: {', '.join(problems)}")
  return 0


def _main(args) -> int:
  if args.verify:
    return _verify(args)
  info = describe(args.path, args.sample_rows)
  if args.json:
    print(json.dumps(info, indent=1, sort_keys=True))
  else:
    _print(info)


def main(argv=None) -> int:
  parser = cli.ArgumentParser(prog='python tools/inspect_store.py', description=__doc__)
  parser.add_argument('path', help='store path or URL')
  parser.add_argument('--sample_rows', type=int, default=8192, help='rows sampled for norm stats')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  parser.add_argument('--verify', action='store_true',
                      help='read every chunk and check it against the manifest (exit 1 if bad)')
  return cli.run_tool(_main, parser, argv)


if __name__ == '__main__':
  sys.exit(main())
