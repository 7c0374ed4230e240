"""Training FLOPs of a sparse autoencoder: the one formula the sweep's compute axis
(`dictlearn.scaling.laws`) and the trainer's MFU (`dictlearn.train.throughput`) share."""


def sae_training_flops(n_latents, tokens, d_model, k=None, sparse_decode: bool = False):
  """Training FLOPs of a sparse autoencoder (works on floats, numpy and jax arrays).

  Per token, with d = d_model, n = n_latents and 2 FLOPs per multiply-accumulate:

      dense kernels                              FLOPs
        encoder forward   z = x W_enc            2 d n
        decoder forward   x_hat = f W_dec        2 n d
        decoder backward  dW_dec = f^T g         2 n d
                          df = g W_dec^T         2 n d
        encoder backward  dW_enc = x^T dz        2 d n
        (no dx: the activations are data, so the encoder's input gradient is skipped)
        total                                    10 d n

  The language-model rule 6 N D counts 2 forward + 4 backward FLOPs per weight;
  with N = 2 d n weights it gives 12 d n, of which 2 d n is the input gradient
  an SAE never needs, hence 10 d n.

      sparse kernels (k active latents per token; DESIGN.md, "sparse after the encoder")
        encoder forward   dense, unavoidable     2 d n
        decoder forward   k rows of W_dec        2 k d
        decoder backward  k rows, and df         4 k d
        encoder backward  k columns of W_enc     2 d k
        total                                    2 d n + 8 d k

  Left out, all O(n + d) per token or amortised over a batch: biases,
  activation and top-k selection, the loss, decoder renormalisation, the
  optimizer update (O(n d) per step, i.e. per `batch_size` tokens), and the AuxK
  loss of top-k SAEs.

  Args:
    n_latents: dictionary size n.
    tokens: training tokens D.
    d_model: activation width d.
    k: active latents per token; required when `sparse_decode`.
    sparse_decode: count the sparse kernels instead of the dense ones.

  Returns:
    FLOPs = (per-token FLOPs) * tokens.

  Raises:
    ValueError: `sparse_decode` without `k`.
  """
  if sparse_decode:
    if k is None:
      raise ValueError('sae_training_flops: sparse_decode=True needs k (active latents per token)')
    per_token = 2.0 * d_model * n_latents + 8.0 * d_model * k
  else:
    per_token = 10.0 * d_model * n_latents
  return per_token * tokens


def model_flops_per_token(architecture: str, n_latents: int, d_model: int, k: int, *,
                          sparse_kernels: bool = False, l0: float | None = None) -> float:
  """Model FLOPs per training token of an SAE, as MFU counts them.

  TopK and BatchTopK have k active latents by construction: the sparse count
  with k (like the active parameters of a mixture of experts). ReLU/L1 and
  JumpReLU have no fixed k: trained with dense kernels (`sae.sparse_capacity`
  0, the convention of Gemma Scope's published MFU) the dense count; with sparse
  kernels, the sparse count at the measured L0 (as the sweep's `flops_sparse`).
  """
  if architecture in ('topk', 'batchtopk'):
    return float(sae_training_flops(n_latents, 1, d_model, k=k, sparse_decode=True))
  if sparse_kernels and l0 is not None:
    return float(sae_training_flops(n_latents, 1, d_model, k=l0, sparse_decode=True))
  return float(sae_training_flops(n_latents, 1, d_model))
