"""SAE architectures: interface, gradients against dense reference recipes, training."""
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from dictlearn import sae as sae_lib
from dictlearn.sae import jumprelu as jr
from experiments import base as base_config

B, D, N = 32, 16, 128
ARCHS = sorted(sae_lib.ARCHITECTURES)


def _cfg(arch, **overrides):
  cfg = base_config.get_config().sae
  cfg.architecture = arch
  cfg.n_latents = N
  cfg.k = 4
  cfg.aux_k = 16
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def _data(seed=0):
  return 1.5 * jax.random.normal(jax.random.key(seed), (B, D))


def _perturbed_params(sae, seed=1):
  """Initial params with noise on every leaf, so biases and b_dec matter."""
  params, buffers = sae.init(jax.random.key(seed))
  keys = jax.random.split(jax.random.key(seed + 100), len(params))
  params = {name: value + 0.05 * jax.random.normal(key, value.shape)
            for key, (name, value) in zip(keys, sorted(params.items()))}
  return params, buffers


def _loss_and_grad(sae, params, buffers, x, coef, dead):
  def loss(p):
    out = sae.forward(p, buffers, x, sparsity_coefficient=coef, dead_mask=dead)
    return out.loss, out
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


# ---- dense reference recipes (straightforward, slow) -----------------------


def _mse(x, x_hat):
  return jnp.sum((x - x_hat) ** 2) / x.shape[0]


def _mask_rows(pre, idx):
  return jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], idx].set(1.0)


def _aux_ref(cfg, p, pre, err, dead):
  n_dead = jnp.sum(dead)
  _, idx = lax.top_k(jnp.where(dead, pre, -jnp.inf), cfg.aux_k)
  z = jax.nn.relu(pre) * _mask_rows(pre, idx) * dead
  e_hat = z @ p['W_dec']
  scale = jnp.minimum(n_dead / cfg.aux_k, 1.0)
  return scale * jnp.sum((e_hat - lax.stop_gradient(err)) ** 2) / err.shape[0]


def _topk_ref(cfg, p, x, coef, dead):
  del coef
  pre = (x - p['b_dec']) @ p['W_enc'] + p['b_enc']
  _, idx = lax.top_k(pre, cfg.k)
  x_hat = (jax.nn.relu(pre) * _mask_rows(pre, idx)) @ p['W_dec'] + p['b_dec']
  return _mse(x, x_hat) + cfg.aux_k_coefficient * _aux_ref(cfg, p, pre, x - x_hat, dead)


def _batchtopk_ref(cfg, p, x, coef, dead):
  del coef
  pre = (x - p['b_dec']) @ p['W_enc'] + p['b_enc']
  acts = jax.nn.relu(pre)
  _, pos = lax.top_k(acts.reshape(-1), cfg.k * x.shape[0])
  mask = jnp.zeros(acts.size).at[pos].set(1.0).reshape(acts.shape)
  x_hat = (acts * mask) @ p['W_dec'] + p['b_dec']
  return _mse(x, x_hat) + cfg.aux_k_coefficient * _aux_ref(cfg, p, pre, x - x_hat, dead)


def _relu_l1_ref(cfg, p, x, coef, dead):
  del cfg, dead
  f = jax.nn.relu(x @ p['W_enc'] + p['b_enc'])
  x_hat = f @ p['W_dec'] + p['b_dec']
  l1 = jnp.sum(f * jnp.linalg.norm(p['W_dec'], axis=1)) / x.shape[0]
  return _mse(x, x_hat) + coef * l1


def _jumprelu_ref(cfg, p, x, coef, dead):
  """JumpReLU with straight-through estimators written with stop_gradient (and
  AuxK on the dead latents for the gemma_scope_auxk recipe)."""
  eps = cfg.jumprelu_bandwidth
  z = x @ p['W_enc'] + p['b_enc']
  theta = jnp.exp(p['log_threshold'])
  on = lax.stop_gradient((z > theta).astype(jnp.float32))
  kernel = lax.stop_gradient((jnp.abs((z - theta) / eps) < 0.5).astype(jnp.float32))
  # f = z * H: d/dz = H, d/dtheta = -(theta / eps) K (value unchanged).
  pseudo = -theta * lax.stop_gradient(theta * kernel / eps)
  f = z * on + pseudo - lax.stop_gradient(pseudo)
  # H: no gradient to z, d/dtheta = -(1 / eps) K.
  pseudo_h = -theta * lax.stop_gradient(kernel / eps)
  h = lax.stop_gradient(on) + pseudo_h - lax.stop_gradient(pseudo_h)
  x_hat = f @ p['W_dec'] + p['b_dec']
  loss = _mse(x, x_hat) + coef * jnp.sum(h) / x.shape[0]
  if cfg.jumprelu_recipe == 'gemma_scope_auxk':
    loss += cfg.aux_k_coefficient * _aux_ref(cfg, p, z, x - x_hat, dead)
  return loss


REFERENCES = {'topk': _topk_ref, 'batchtopk': _batchtopk_ref, 'relu_l1': _relu_l1_ref,
              'jumprelu': _jumprelu_ref}


def _check_against_reference(cfg, params, buffers, x, coef, dead):
  """Autodiff of `forward` and the trainer's `loss_and_grads` both match the recipe."""
  sae = sae_lib.make_sae(cfg, D)
  (loss, out), grads = _loss_and_grad(sae, params, buffers, x, coef, dead)
  out2, grads2 = jax.jit(lambda p: sae.loss_and_grads(p, buffers, x, sparsity_coefficient=coef,
                                                      dead_mask=dead))(params)
  ref = lambda p: REFERENCES[cfg.architecture](cfg, p, x, coef, dead)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(ref))(params)
  for l, g in ((loss, grads), (out2.loss, grads2)):
    _close(l, ref_loss)
    assert set(g) == set(ref_grads)
    for name in g:
      _close(g[name], ref_grads[name])
  assert set(out2.metrics) == set(out.metrics)
  return out, grads


# ---- interface -------------------------------------------------------------


def test_make_sae_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match='batchtopk.*jumprelu.*relu_l1.*topk'):
    sae_lib.make_sae(_cfg('gated'), D)


@pytest.mark.parametrize('field,value', [('dtype', 'float16'), ('encoder_block_size', 48),
                                         ('k', 0), ('sparse_capacity', N + 1),
                                         ('sparse_capacity', -1)])
def test_bad_config_raises(field, value):
  with pytest.raises(ValueError, match=field):
    sae_lib.make_sae(_cfg('topk' if field != 'sparse_capacity' else 'relu_l1',
                          **{field: value}), D)


@pytest.mark.parametrize('overrides,match', [
    ({'jumprelu_recipe': 'anthropic'}, "jumprelu_recipe='anthropic'.*gemma_scope_auxk"),
    ({'jumprelu_recipe': 'gemma_scope_auxk', 'aux_k': 0}, 'aux_k=0'),
])
def test_bad_jumprelu_recipe_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    sae_lib.make_sae(_cfg('jumprelu', **overrides), D)


@pytest.mark.parametrize('arch', ARCHS)
def test_init_shapes_and_logical_axes(arch):
  sae = sae_lib.make_sae(_cfg(arch), D)
  params, buffers = sae.init(jax.random.key(0))
  axes = sae.logical_axes()
  is_axes = lambda t: isinstance(t, tuple) and all(isinstance(a, str) for a in t)
  assert jax.tree.structure((params, buffers)) == jax.tree.structure(axes, is_leaf=is_axes)
  sizes = {'embed': D, 'latent': N}
  for value, names in zip(jax.tree.leaves((params, buffers)),
                          jax.tree.leaves(axes, is_leaf=is_axes)):
    assert value.shape == tuple(sizes[a] for a in names)
  assert params['W_enc'].shape == (D, N) and params['W_dec'].shape == (N, D)
  np.testing.assert_allclose(params['W_enc'], params['W_dec'].T)
  norms = np.linalg.norm(params['W_dec'], axis=1)
  expect = 0.1 if arch == 'relu_l1' else 1.0  # decoder_init_norm applies to relu_l1
  np.testing.assert_allclose(norms, expect, rtol=1e-5)
  if arch == 'jumprelu':
    np.testing.assert_allclose(np.exp(params['log_threshold']), 0.001, rtol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
def test_forward_outputs(arch):
  cfg = _cfg(arch)
  sae = sae_lib.make_sae(cfg, D)
  params, buffers = sae.init(jax.random.key(0))
  x = _data()
  out = jax.jit(lambda p, b, x: sae.forward(p, b, x, sparsity_coefficient=1.0,
                                            dead_mask=jnp.zeros(N, bool)))(params, buffers, x)
  assert np.isfinite(out.loss) and out.loss.shape == ()
  assert {'mse', 'fvu', 'l0'} <= set(out.metrics)
  assert all(v.shape == () for v in out.metrics.values())
  assert out.fired.shape == (N,) and out.fired.dtype == jnp.float32
  dense = sae.encode(params, buffers, x)
  assert dense.shape == (B, N)
  _close(jnp.sum(out.fired), out.metrics['l0'] * B)
  assert jax.tree.structure(out.buffers) == jax.tree.structure(buffers)
  # The sparse inference path equals the dense one.
  _close(jax.jit(sae.reconstruct)(params, buffers, x), sae.decode(params, dense))


@pytest.mark.parametrize('arch,capacity', [('topk', 0), ('jumprelu', 48)])
def test_bfloat16(arch, capacity):
  cfg32 = _cfg(arch, sparse_capacity=capacity)
  cfg16 = _cfg(arch, sparse_capacity=capacity, dtype='bfloat16', param_dtype='bfloat16')
  sae32, sae16 = sae_lib.make_sae(cfg32, D), sae_lib.make_sae(cfg16, D)
  params, buffers = _perturbed_params(sae32)
  params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  dead = jnp.zeros(N, bool)
  (l32, _), _ = _loss_and_grad(sae32, params, buffers, _data(), 0.1, dead)
  (l16, out), grads = _loss_and_grad(sae16, params16, buffers, _data(), 0.1, dead)
  assert out.loss.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in grads.values())
  np.testing.assert_allclose(l16, l32, rtol=0.05)


# ---- gradients against the dense recipes -------------------------------------


@pytest.mark.parametrize('arch,overrides', [
    ('topk', {}),
    ('topk', {'encoder_block_size': 32}),
    ('topk', {'aux_k': 32}),  # 26 dead <= aux_dense_cap: the dense AuxK path
    ('batchtopk', {'sparse_capacity': 0}),
    ('batchtopk', {'sparse_capacity': 12}),
    ('relu_l1', {'sparse_capacity': 0}),
    ('relu_l1', {'sparse_capacity': 100}),  # no overflow: sparse branch
    ('relu_l1', {'sparse_capacity': 8}),    # overflow: dense fallback
    ('jumprelu', {'sparse_capacity': 0, 'jumprelu_bandwidth': 0.5}),
    ('jumprelu', {'sparse_capacity': 48, 'jumprelu_bandwidth': 0.5}),
    ('jumprelu', {'sparse_capacity': 4, 'jumprelu_bandwidth': 0.5}),
    # AuxK on the 26 dead latents: densely, and (more dead than aux_dense_cap = 16)
    # by the dense fallback of the sparse path.
    ('jumprelu', {'sparse_capacity': 0, 'jumprelu_bandwidth': 0.5,
                  'jumprelu_recipe': 'gemma_scope_auxk', 'aux_k_coefficient': 0.5}),
    ('jumprelu', {'sparse_capacity': 48, 'jumprelu_bandwidth': 0.5,
                  'jumprelu_recipe': 'gemma_scope_auxk', 'aux_k_coefficient': 0.5}),
])
def test_gradients_match_dense_reference(arch, overrides):
  cfg = _cfg(arch, **overrides)
  sae = sae_lib.make_sae(cfg, D)
  params, buffers = _perturbed_params(sae)
  x = _data()
  if arch == 'jumprelu':  # thresholds near the pre-activations: some in the band
    pre = x @ params['W_enc'] + params['b_enc']
    params['log_threshold'] = jnp.log(jnp.quantile(jnp.abs(pre), 0.8, axis=0))
  dead = jnp.arange(N) % 5 == 0
  out, grads = _check_against_reference(cfg, params, buffers, x, 0.3, dead)
  capacity = overrides.get('sparse_capacity', 0)
  if arch in ('relu_l1', 'jumprelu') and capacity:
    assert bool(out.metrics['overflow']) == (capacity < 10), out.metrics
  if overrides.get('jumprelu_recipe') == 'gemma_scope_auxk':
    assert float(out.metrics['aux_k']) > 0 and float(out.metrics['n_dead']) == 26
  if arch == 'jumprelu':  # the threshold learns through the pseudo-derivative
    assert np.count_nonzero(grads['log_threshold']) > N // 4


@pytest.mark.parametrize('arch,overrides', [
    ('topk', {}), ('batchtopk', {}),
    ('jumprelu', {'jumprelu_recipe': 'gemma_scope_auxk', 'jumprelu_bandwidth': 0.5}),
    # the sparse path's dense AuxK over the gathered dead latents
    ('jumprelu', {'jumprelu_recipe': 'gemma_scope_auxk', 'jumprelu_bandwidth': 0.5,
                  'sparse_capacity': 48}),
])
def test_aux_k_zero_without_dead_latents(arch, overrides):
  cfg = _cfg(arch, **overrides)
  sae = sae_lib.make_sae(cfg, D)
  params, buffers = _perturbed_params(sae)
  x = _data()
  if arch == 'jumprelu':  # a few active per token, as in training
    params['log_threshold'] = jnp.log(jnp.quantile(jnp.abs(x @ params['W_enc']), 0.8, axis=0))
  (_, out), _ = _loss_and_grad(sae, params, buffers, x, 0.0, jnp.zeros(N, bool))
  assert float(out.metrics['aux_k']) == 0.0
  # Fewer dead than aux_k (scaled by 3 / aux_k), then at most the dense cap
  # (dense AuxK over the gathered dead latents); the gradient tests cover more.
  for dead in (jnp.arange(N) < 3, jnp.arange(N) % 9 == 2):
    (loss, out), grads = _loss_and_grad(sae, params, buffers, x, 0.0, dead)
    assert float(out.metrics['aux_k']) > 0.0
    _close(loss, out.metrics['mse'] + cfg.aux_k_coefficient * out.metrics['aux_k'])
    if overrides.get('sparse_capacity'):
      assert float(out.metrics['overflow']) == 0.0  # the sparse branch ran
    _check_against_reference(cfg, params, buffers, x, 0.0, dead)


def test_batchtopk_keeps_k_times_batch_and_learns_threshold():
  cfg = _cfg('batchtopk', sparse_capacity=12, batchtopk_threshold_momentum=0.9)
  sae = sae_lib.make_sae(cfg, D)
  params, buffers = _perturbed_params(sae)
  x = _data()
  fwd = jax.jit(lambda b: sae.forward(params, b, x, sparsity_coefficient=0.0,
                                      dead_mask=jnp.zeros(N, bool)))
  out = fwd(buffers)
  pre = (x - params['b_dec']) @ params['W_enc'] + params['b_enc']
  kept = jnp.sort(jax.nn.relu(pre).reshape(-1))[-cfg.k * B:]
  assert float(jnp.sum(out.fired)) == cfg.k * B  # all kept are positive here
  _close(out.buffers['threshold'], kept[0])  # the first batch sets theta
  out2 = fwd(out.buffers)
  _close(out2.buffers['threshold'], kept[0])  # EMA of identical batches
  buffers = dict(out.buffers, threshold=jnp.float32(2.0))
  out3 = fwd(buffers)
  _close(out3.buffers['threshold'], 0.9 * 2.0 + 0.1 * kept[0])
  acts = sae.encode(params, buffers, x)
  _close(acts, jnp.where(pre > 2.0, pre, 0.0))


def test_batchtopk_floor_path_is_exact():
  # The first batch sets the floor from its per-token candidates; an identical
  # batch then takes the floor path, and matches the dense recipe.
  cfg = _cfg('batchtopk', sparse_capacity=12)
  sae = sae_lib.make_sae(cfg, D)
  params, buffers = _perturbed_params(sae)
  x = _data()
  few_dead = jnp.arange(N) % 10 == 0  # 13 <= aux_dense_cap: the dense AuxK path
  fwd = jax.jit(lambda b, dead: sae.forward(params, b, x, sparsity_coefficient=0.0,
                                            dead_mask=dead))
  first = fwd(buffers, few_dead)
  assert float(first.metrics['selection_fallback']) == 1.0
  floor = float(first.buffers['selection_floor'])
  pre = (x - params['b_dec']) @ params['W_enc'] + params['b_enc']
  assert 0 < floor < float(jnp.sort(pre.reshape(-1))[-cfg.k * B])
  out, _ = _check_against_reference(cfg, params, first.buffers, x, 0.0, few_dead)
  assert float(out.metrics['selection_fallback']) == 0.0
  assert float(out.metrics['aux_k']) > 0
  # Too many dead latents for the dense AuxK path, or a floor above the
  # threshold: the per-token candidates serve, exactly.
  for dead, floor in ((jnp.arange(N) % 2 == 0, floor), (few_dead, 1e3)):
    buffers = dict(first.buffers, selection_floor=jnp.float32(floor))
    out, _ = _check_against_reference(cfg, params, buffers, x, 0.0, dead)
    assert float(out.metrics['selection_fallback']) == 1.0


def test_jumprelu_threshold_pseudo_gradient():
  z = jnp.array([0.9, 0.99, 1.01, 1.2, 0.5])
  theta = jnp.ones(5)
  eps = 0.1
  g_f = jax.grad(lambda t: jnp.sum(jr.jumprelu(z, t, eps)))(theta)
  g_h = jax.grad(lambda t: jnp.sum(jr.step(z, t, eps)))(theta)
  g_z = jax.grad(lambda z: jnp.sum(jr.jumprelu(z, theta, eps) + jr.step(z, theta, eps)))(z)
  _close(g_f, [0.0, -10.0, -10.0, 0.0, 0.0])
  _close(g_h, [0.0, -10.0, -10.0, 0.0, 0.0])
  _close(g_z, [0.0, 0.0, 1.0, 1.0, 0.0])


# ---- decoder constraints ------------------------------------------------------


@pytest.mark.parametrize('arch', ARCHS)
def test_process_grads_and_params(arch):
  sae = sae_lib.make_sae(_cfg(arch), D)
  params, _ = _perturbed_params(sae)
  params = sae.process_params(params)
  grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape), params)
  new = sae.process_grads(params, grads)
  if arch == 'relu_l1':
    assert new is grads or all(np.array_equal(new[k], grads[k]) for k in grads)
    return
  np.testing.assert_allclose(np.linalg.norm(params['W_dec'], axis=1), 1.0, rtol=1e-5)
  _close(jnp.sum(new['W_dec'] * params['W_dec'], axis=1), np.zeros(N))
  _close(new['W_enc'], grads['W_enc'])
  scaled = dict(params, W_dec=3.0 * params['W_dec'])
  np.testing.assert_allclose(np.linalg.norm(sae.process_params(scaled)['W_dec'], axis=1),
                             1.0, rtol=1e-5)


def test_init_b_dec_geometric_median():
  sae = sae_lib.make_sae(_cfg('topk'), D)
  params, _ = sae.init(jax.random.key(0))
  sample = jnp.concatenate([jnp.zeros((9, D)) + 1.0, jnp.full((1, D), 1000.0)])
  out = sae.init_b_dec(params, sample)
  np.testing.assert_allclose(out['b_dec'], 1.0, atol=1e-3)  # the outlier barely moves it
  with pytest.raises(ValueError, match='sample'):
    sae.init_b_dec(params, jnp.zeros((4, D + 1)))


@pytest.mark.slow
def test_sharded_forward_matches_unsharded():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  rules = {'embed': None, 'latent': 'model'}
  auxk = {'jumprelu_recipe': 'gemma_scope_auxk', 'jumprelu_bandwidth': 0.5}
  cases = [('topk', {}), ('jumprelu', {'sparse_capacity': 48}),
           ('relu_l1', {'sparse_capacity': 64}), ('batchtopk', {'sparse_capacity': 12}),
           ('jumprelu', dict(auxk, sparse_capacity=0)), ('jumprelu', dict(auxk, sparse_capacity=48))]
  for arch, overrides in cases:
    cfg = _cfg(arch, **overrides)
    sae = sae_lib.make_sae(cfg, D)
    params, buffers = _perturbed_params(sae)
    # AuxK (topk, batchtopk, jumprelu's auxk recipe) over 10 dead latents, densely
    # over the gathered ones; the others have no AuxK.
    x = _data()
    with_aux = arch in ('topk', 'batchtopk') or 'jumprelu_recipe' in overrides
    dead = (jnp.arange(N) < 10) if with_aux else (jnp.arange(N) % 5 == 0)
    if 'jumprelu_recipe' in overrides:  # a few active per token: the sparse branch
      params['log_threshold'] = jnp.log(jnp.quantile(jnp.abs(x @ params['W_enc']), 0.8, axis=0))
    if arch == 'batchtopk':  # a floor from a first batch: the floor path
      buffers = sae.forward(params, buffers, x, sparsity_coefficient=0.1, dead_mask=dead).buffers
    axes, _ = sae.logical_axes()
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P(*[rules[a] for a in axes[k]])))
               for k, v in params.items()}
    xs = jax.device_put(x, NamedSharding(mesh, P('data', None)))
    trainer_path = jax.jit(lambda p, x: sae.loss_and_grads(p, buffers, x, sparsity_coefficient=0.1,
                                                           dead_mask=dead))
    (l1, out1), g1 = _loss_and_grad(sae, params, buffers, x, 0.1, dead)
    (l2, _), g2 = _loss_and_grad(sae, sharded, buffers, xs, 0.1, dead)
    (out3, g3), (out4, g4) = trainer_path(params, x), trainer_path(sharded, xs)
    if arch == 'batchtopk':
      assert float(out1.metrics['selection_fallback']) == 0.0
    for loss, grads in ((l2, g2), (out3.loss, g3), (out4.loss, g4)):
      _close(l1, loss)
      for k in g1:
        _close(g1[k], grads[k])


# ---- training on synthetic superposition data ----------------------------------


N_TRUE, D_TRUE = 128, 32


def _superposition(seed=0, mean_active=4.0):
  """True unit directions F [N_TRUE, D_TRUE] and a sampler of their sparse sums."""
  f = jax.random.normal(jax.random.key(seed), (N_TRUE, D_TRUE))
  f = f / jnp.linalg.norm(f, axis=1, keepdims=True)
  p = mean_active / N_TRUE
  scale = jnp.sqrt(D_TRUE / (mean_active * (1.0 + 1.0 / 12.0)))  # E||x||^2 ~ d

  def sample(key, batch):
    k1, k2 = jax.random.split(key)
    on = jax.random.bernoulli(k1, p, (batch, N_TRUE))
    mag = jax.random.uniform(k2, (batch, N_TRUE), minval=0.5, maxval=1.5)
    return scale * (on * mag) @ f

  return f, sample


def _train(cfg, steps, lr, batch=1024):
  """Plain Adam loop; returns (first loss, last loss, true directions, params)."""
  f, sample = _superposition()
  sae = sae_lib.make_sae(cfg, D_TRUE)
  params, buffers = sae.init(jax.random.key(1))
  params = sae.init_b_dec(params, sample(jax.random.key(99), 4096))
  opt = optax.adam(lr)
  warmup = max(1, int(cfg.sparsity_warmup_fraction * steps))

  @jax.jit
  def step(params, buffers, opt_state, unfired, i):
    x = sample(jax.random.fold_in(jax.random.key(2), i), batch)
    coef = cfg.sparsity_coefficient * jnp.minimum(1.0, i / warmup)
    dead = unfired > cfg.dead_tokens_threshold

    def loss(p):
      out = sae.forward(p, buffers, x, sparsity_coefficient=coef, dead_mask=dead)
      return out.loss, out

    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    grads = sae.process_grads(params, grads)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = sae.process_params(optax.apply_updates(params, updates))
    unfired = jnp.where(out.fired > 0, 0, unfired + batch)
    return params, out.buffers, opt_state, unfired, out.metrics['mse']

  state = (params, buffers, opt.init(params), jnp.zeros(cfg.n_latents))
  losses = []
  for i in range(steps):
    *state, mse = step(*state, i)
    losses.append(mse)
  return float(np.mean(losses[:10])), float(np.mean(losses[-10:])), f, state[0]


def _recovered(f, params, cos=0.9):
  w = params['W_dec'] / jnp.linalg.norm(params['W_dec'], axis=1, keepdims=True)
  return float(jnp.mean(jnp.max(f @ w.T, axis=1) >= cos))


# arch: (config overrides, steps, learning rate, batch, recovered fraction wanted).
# Data: 128 true unit directions in 32 dims, ~4 active per row, E||x||^2 = d.
TRAINING = {
    'topk': (dict(k=4, aux_k=32), 600, 2e-3, 1024, 0.9),
    'relu_l1': (dict(sparsity_coefficient=2.0), 1000, 1e-3, 256, 0.9),
    # BatchTopK and JumpReLU settle with many true directions only partly
    # absorbed in 1000 steps (measured: batchtopk 0.67, jumprelu 0.70; with the
    # earlier lr 2e-3 / lambda 2.0, 0.48 and 0.61); tests/test_ground_truth.py
    # has the longer runs and the reasons.
    'batchtopk': (dict(k=4, aux_k=32, aux_k_coefficient=0.5), 1000, 6e-3, 512, 0.6),
    'jumprelu': (dict(sparsity_coefficient=4.0, jumprelu_bandwidth=0.5,
                      jumprelu_threshold_init=1.0), 1000, 5e-3, 1024, 0.6),
}


@pytest.mark.parametrize('arch', sorted(TRAINING))
def test_training_recovers_true_features(arch):
  overrides, steps, lr, batch, want = TRAINING[arch]
  cfg = _cfg(arch, n_latents=256, dead_tokens_threshold=20 * batch, **overrides)
  first, last, f, params = _train(cfg, steps, lr, batch)
  assert last < 0.5 * first, (first, last)
  assert _recovered(f, params) >= want, _recovered(f, params)
