"""dictlearn's sparsify files read by the real sparsify (run with the peers' python).

    /work/peers-venv/bin/python tools/check_sparsify_format.py check SAE_DIR INPUTS.npy EXPECTED.npy
    /work/peers-venv/bin/python tools/check_sparsify_format.py fixtures OUT_DIR

`check` loads SAE_DIR with `SparseCoder.load_from_disk`, reconstructs the raw
activations INPUTS.npy (`encode` then `decode`, as sparsify's forward does) and
prints one JSON line: the max absolute difference from EXPECTED.npy (dictlearn's
reconstructions), the largest |expected|, and the rows whose chosen latents differ
from EXPECTED_codes.npy when present.

`fixtures` writes a small sparsify TopK SAE as sparsify saves it (`save_to_disk`)
with inputs.npy, sparsify's reconstructions.npy and codes.npy, for dictlearn's tests
(tests/data/sparsify/layers.1). The peers' environment: /work/shared/bench/peers/README.md.
"""
import json
import os
import sys

os.environ.setdefault('SPARSIFY_DISABLE_TRITON', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402


def _run(sae, x):
  with torch.no_grad():
    top_acts, top_indices, _ = sae.encode(x)
    out = sae.decode(top_acts, top_indices)
  codes = torch.zeros(x.shape[0], sae.num_latents).scatter_(1, top_indices, top_acts)
  return out.numpy(), codes.numpy()


def check(sae_dir, inputs, expected):
  sae = SparseCoder.load_from_disk(sae_dir)
  out, codes = _run(sae, torch.from_numpy(np.load(inputs)))
  want = np.load(expected)
  result = {'sae_dir': sae_dir, 'rows': int(out.shape[0]),
            'max_abs_diff': float(np.max(np.abs(out - want))),
            'max_abs_expected': float(np.max(np.abs(want)))}
  codes_path = expected[:-len('.npy')] + '_codes.npy'
  if os.path.exists(codes_path):
    same = (codes > 0) == (np.load(codes_path) > 0)
    result['rows_with_other_latents'] = int(np.sum(~same.all(axis=1)))
  print(json.dumps(result))


def fixtures(out):
  torch.manual_seed(0)
  sae = SparseCoder(8, SparseCoderConfig(num_latents=16, k=3))
  with torch.no_grad():
    for p in sae.parameters():
      p.copy_(torch.randn_like(p) * 0.5)
    sae.set_decoder_norm_to_unit_norm()
  path = os.path.join(out, 'layers.1')
  sae.save_to_disk(path)
  x = torch.randn(32, 8) * 2
  reconstructions, codes = _run(SparseCoder.load_from_disk(path), x)
  np.save(os.path.join(path, 'inputs.npy'), x.numpy())
  np.save(os.path.join(path, 'reconstructions.npy'), reconstructions)
  np.save(os.path.join(path, 'codes.npy'), codes)
  print('topk ->', path)


if __name__ == '__main__':
  if len(sys.argv) == 5 and sys.argv[1] == 'check':
    check(*sys.argv[2:])
  elif len(sys.argv) == 3 and sys.argv[1] == 'fixtures':
    fixtures(sys.argv[2])
  else:
    sys.exit(__doc__)
