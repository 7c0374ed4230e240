"""dictlearn's SAELens files read by the real sae_lens (run with the peers' python).

    /work/peers-venv/bin/python tools/check_saelens_format.py check SAE_DIR INPUTS.npy EXPECTED.npy
    /work/peers-venv/bin/python tools/check_saelens_format.py fixtures OUT_DIR

`check` loads SAE_DIR with `SAE.load_from_disk`, reconstructs the raw activations
INPUTS.npy [N, d_in] (`sae(x)`) and prints one JSON line: the max absolute
difference from EXPECTED.npy (dictlearn's reconstructions of the same rows), the
largest |expected|, and how many rows choose a different set of active latents
(computed by dictlearn's side as EXPECTED_codes.npy when present).

`fixtures` writes small SAEs of every architecture as sae_lens itself saves them
(`save_model`; BatchTopK through `save_inference_model`), each with inputs.npy
and SAELens's reconstructions.npy and codes.npy, for dictlearn's tests
(tests/data/saelens). The peers' environment: /work/shared/bench/peers/README.md.
"""
import json
import os
import sys

import numpy as np
import torch

import sae_lens
from sae_lens import SAE
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig


def check(sae_dir, inputs, expected):
  sae = SAE.load_from_disk(sae_dir)
  x = torch.from_numpy(np.load(inputs))
  with torch.no_grad():
    codes = sae.encode(x)
    out = sae.decode(codes).numpy()
  want = np.load(expected)
  result = {'sae_dir': sae_dir, 'sae_lens': sae_lens.__version__,
            'saelens_architecture': sae.cfg.architecture(), 'rows': int(x.shape[0]),
            'max_abs_diff': float(np.max(np.abs(out - want))),
            'max_abs_expected': float(np.max(np.abs(want)))}
  codes_path = expected[:-len('.npy')] + '_codes.npy'
  if os.path.exists(codes_path):
    same = (codes.numpy() > 0) == (np.load(codes_path) > 0)
    result['rows_with_other_latents'] = int(np.sum(~same.all(axis=1)))
  print(json.dumps(result))


def fixtures(out):
  torch.manual_seed(0)
  d_in, d_sae = 8, 16
  metadata = lambda: SAEMetadata(model_name='toy', hook_name='blocks.1.hook_resid_post',
                                 hook_head_index=None, prepend_bos=True, context_size=32)
  saes = {
      'standard': StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata(),
                                                apply_b_dec_to_input=True)),
      'topk': TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=3, metadata=metadata())),
      'topk_rescaled': TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=3, metadata=metadata(),
                                             rescale_acts_by_decoder_norm=True,
                                             apply_b_dec_to_input=False)),
      'jumprelu': JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata(),
                                                apply_b_dec_to_input=False)),
  }
  batchtopk = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=3,
                                                              metadata=metadata()))
  for sae in list(saes.values()) + [batchtopk]:
    with torch.no_grad():
      for name, p in sae.named_parameters():
        p.copy_(torch.randn_like(p) * (0.5 if name.startswith('b_') else 1.0))
      if hasattr(sae, 'threshold'):
        sae.threshold.copy_(torch.rand_like(sae.threshold) * 2 - 0.5)  # some <= 0
  batchtopk.topk_threshold = torch.tensor(0.7, dtype=torch.double)
  x = torch.randn(32, d_in) * 2
  for name, sae in list(saes.items()) + [('batchtopk', batchtopk)]:
    path = os.path.join(out, name)
    if name == 'batchtopk':
      batchtopk.save_inference_model(path)
      sae = SAE.load_from_disk(path)
    else:
      sae.save_model(path)
    with torch.no_grad():
      codes = sae.encode(x)
      np.save(os.path.join(path, 'reconstructions.npy'), sae.decode(codes).numpy())
    np.save(os.path.join(path, 'codes.npy'), codes.numpy())
    np.save(os.path.join(path, 'inputs.npy'), x.numpy())
    print(name, '->', path)


if __name__ == '__main__':
  if len(sys.argv) == 5 and sys.argv[1] == 'check':
    check(*sys.argv[2:])
  elif len(sys.argv) == 3 and sys.argv[1] == 'fixtures':
    fixtures(sys.argv[2])
  else:
    sys.exit(__doc__)
