"""Sparse autoencoder architectures over a shared interface (`base`).

    sae = make_sae(config.sae, d_model)
    params, buffers = sae.init(key)
    out = sae.forward(params, buffers, x, sparsity_coefficient=c, dead_mask=dead)

`kernels` holds the sparse encode/decode with custom VJPs they all use.
"""
import ml_collections

from dictlearn.sae.base import ForwardOutput
from dictlearn.sae.base import SparseAutoencoder
from dictlearn.sae.batchtopk import BatchTopKSAE
from dictlearn.sae.jumprelu import JumpReLUSAE
from dictlearn.sae.relu_l1 import ReluL1SAE
from dictlearn.sae.topk import TopKSAE

ARCHITECTURES = {
    'relu_l1': ReluL1SAE,
    'topk': TopKSAE,
    'batchtopk': BatchTopKSAE,
    'jumprelu': JumpReLUSAE,
}


def make_sae(sae_config: ml_collections.ConfigDict, d_model: int) -> SparseAutoencoder:
  """Builds the SAE named by `sae_config.architecture`.

  Args:
    sae_config: the `sae` section of the config.
    d_model: activation width.

  Returns:
    A SparseAutoencoder.

  Raises:
    ValueError: unknown architecture (the message lists the valid ones) or an
      invalid field.
  """
  name = sae_config.architecture
  if name not in ARCHITECTURES:
    raise ValueError(f'sae.architecture={name!r} is not one of {sorted(ARCHITECTURES)}')
  return ARCHITECTURES[name](sae_config, d_model)


__all__ = ['ARCHITECTURES', 'BatchTopKSAE', 'ForwardOutput', 'JumpReLUSAE', 'ReluL1SAE',
           'SparseAutoencoder', 'TopKSAE', 'make_sae']
