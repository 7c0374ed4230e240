"""Sparse autoencoder architectures over a shared interface (`base`).

    sae = make_sae(config.sae, d_model)
    params, buffers = sae.init(key)
    out = sae.forward(params, buffers, x, sparsity_coefficient=c, dead_mask=dead)

`sparse` holds the sparse paths they all take (top-k and capacity selection,
row gathers and scatters, the sparse decoder and the encoder's custom VJP).
"""
import ml_collections

from dictlearn.sae import sparse
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


def make_sae(sae_config: ml_collections.ConfigDict, d_model: int,
             tuning: sparse.KernelTuning = sparse.DEFAULT_TUNING) -> SparseAutoencoder:
  """Builds the SAE named by `sae_config.architecture`.

  Args:
    sae_config: the `sae` section of the config.
    d_model: activation width.
    tuning: tile and loop sizes of the sparse kernels (results do not depend on it).

  Returns:
    A SparseAutoencoder.

  Raises:
    ValueError: unknown architecture (the message lists the valid ones) or an
      invalid field.
  """
  name = sae_config.architecture
  if name not in ARCHITECTURES:
    raise ValueError(f'sae.architecture={name!r} is not one of {sorted(ARCHITECTURES)}')
  return ARCHITECTURES[name](sae_config, d_model, tuning)


__all__ = ['ARCHITECTURES', 'BatchTopKSAE', 'ForwardOutput', 'JumpReLUSAE', 'ReluL1SAE',
           'SparseAutoencoder', 'TopKSAE', 'make_sae']
