"""Throughput of the sparse SAE kernels against the dense formulation.

    python tools/bench_kernels.py                      # d=576, n=16384, B=4096, k=32
    python tools/bench_kernels.py --n_latents 4096 --repeats 3

Times (median of --repeats after a warm-up) on the default JAX device:
  * the encoder matmul alone, x @ W_enc + b_enc: the ceiling of any SAE step;
  * TopK forward + backward through `TopKSAE.forward` (sparse kernels), without
    and with dead latents (AuxK on);
  * TopK forward + backward by the dense formulation (masked [B, n] activations,
    dense decoder, autodiff);
  * ReLU-L1 forward + backward with `sparse_capacity` (activations made sparse by
    a negative encoder bias) and densely;
  * the column sums of a [B, n] matrix as a reduction over its leading axis
    and as `sparse.batch_sum`'s product with a ones vector.
Prints tokens/s and the fraction of the ceiling. Not a test.
"""
import os
import statistics
import time

import jax
from jax import lax
import jax.numpy as jnp

from dictlearn import cli
from dictlearn import sae as sae_lib
from dictlearn.sae import sparse
base_config = cli.experiment('base')


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _sae(arch, n_latents, k, capacity):
  cfg = base_config.get_config().sae
  cfg.architecture = arch
  cfg.n_latents = n_latents
  cfg.k = k
  cfg.sparse_capacity = capacity
  return cfg


def _sae_step(sae):
  def step(params, x, dead):
    out, grads = sae.loss_and_grads(params, {}, x, sparsity_coefficient=1.0, dead_mask=dead)
    return out.loss, grads
  return jax.jit(step)


def _dense_topk_step(k):
  def step(params, x):
    def loss(p):
      pre = (x - p['b_dec']) @ p['W_enc'] + p['b_enc']
      _, idx = lax.top_k(pre, k)
      mask = jnp.zeros_like(pre).at[jnp.arange(x.shape[0])[:, None], idx].set(1.0)
      x_hat = (jax.nn.relu(pre) * mask) @ p['W_dec'] + p['b_dec']
      return jnp.sum((x - x_hat) ** 2) / x.shape[0]
    return jax.value_and_grad(loss)(params)
  return jax.jit(step)


def main():
  parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--d_model', type=int, default=576)
  parser.add_argument('--n_latents', type=int, default=16384)
  parser.add_argument('--batch', type=int, default=4096)
  parser.add_argument('--k', type=int, default=32)
  parser.add_argument('--capacity', type=int, default=64,
                      help='relu_l1 sparse_capacity (slots per token on average)')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  d, n, batch, k = args.d_model, args.n_latents, args.batch, args.k
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; '
        f'd={d} n={n} B={batch} k={k}, median of {args.repeats}')

  key_x, key_p = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (batch, d)) * 1.0
  topk = sae_lib.make_sae(_sae('topk', n, k, 0), d)
  params, _ = topk.init(key_p)

  results = []
  ceiling = _time(jax.jit(lambda x, w, b: x @ w + b),
                  (x, params['W_enc'], params['b_enc']), args.repeats)
  results.append(('encoder matmul only (ceiling)', ceiling))
  no_dead = jnp.zeros(n, bool)
  some_dead = jnp.arange(n) % 8 == 0
  results.append(('topk fwd+bwd, sparse kernels',
                  _time(_sae_step(topk), (params, x, no_dead), args.repeats)))
  results.append(('topk fwd+bwd, sparse, 1/8 dead (AuxK 256)',
                  _time(_sae_step(topk), (params, x, some_dead), args.repeats)))
  results.append(('topk fwd+bwd, dense formulation',
                  _time(_dense_topk_step(k), (params, x), args.repeats)))

  # ReLU-L1 with about k active latents per token: shift b_enc so that each
  # latent fires on a fraction k / n of the tokens.
  relu_sparse = sae_lib.make_sae(_sae('relu_l1', n, k, args.capacity), d)
  relu_dense = sae_lib.make_sae(_sae('relu_l1', n, k, 0), d)
  rparams, _ = relu_sparse.init(key_p)
  pre = x @ rparams['W_enc']
  rparams['b_enc'] = -jnp.quantile(pre, 1.0 - k / n, axis=0)
  out = relu_sparse.forward(rparams, {}, x, sparsity_coefficient=1.0, dead_mask=no_dead)
  print(f"relu_l1: l0={float(out.metrics['l0']):.1f}, capacity {args.capacity}, "
        f"overflow={bool(out.metrics['overflow'])}")
  results.append((f'relu_l1 fwd+bwd, sparse (capacity {args.capacity})',
                  _time(_sae_step(relu_sparse), (rparams, x, no_dead), args.repeats)))
  results.append(('relu_l1 fwd+bwd, dense formulation',
                  _time(_sae_step(relu_dense), (rparams, x, no_dead), args.repeats)))

  print(f"{'':46s} {'seconds':>8s} {'tokens/s':>10s} {'of ceiling':>10s}")
  for name, seconds in results:
    print(f'{name:46s} {seconds:8.3f} {batch / seconds:10.0f} {ceiling / seconds:10.2f}')

  # The sums over the batch that the dense formulations need (fired counts,
  # bias gradients): a reduction over the leading axis against the product
  # dictlearn writes them as (`sparse.batch_sum`).
  acts = jax.jit(lambda x, w: jax.nn.relu(x @ w))(x, params['W_enc'])
  reduce = _time(jax.jit(lambda a: jnp.sum(a, axis=0)), (acts,), args.repeats)
  product = _time(jax.jit(sparse.batch_sum), (acts,), args.repeats)
  print(f'column sums of the [B, n] activations: jnp.sum(axis=0) {reduce:.3f} s, '
        f'sparse.batch_sum {product:.3f} s ({reduce / product:.1f}x faster)')


if __name__ == '__main__':
  cli.run_main(main)
