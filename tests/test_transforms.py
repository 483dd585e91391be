"""Tests jaxshape/transforms.py: clipping, Gaussian and adaptive noise, DP chains.

Bad inputs (hyperparameters, gradient shapes) are in test_transforms_bad_inputs.py.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxshape import grads
from jaxshape import transforms
from tests.helpers import run

B = 8
PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])


def _per_example(key=0, scale=3.0):
  kw, kb = jax.random.split(jax.random.key(key))
  return {
    "w": scale * jax.random.normal(kw, (B, 4, 3)),
    "b": scale * jax.random.normal(kb, (B, 3)),
  }


def _update(tx, g, params=PARAMS):
  state = tx.init(params)
  return tx.update(g, state, params)


def _clipped_sum_loop(g, clip):
  """Reference: a Python loop over examples in float64, each scaled by min(1, C / ||g_i||)."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
  total = [np.zeros(x.shape[1:]) for x in leaves]
  norms = []
  for i in range(B):
    norm = np.sqrt(sum(np.sum(x[i] ** 2) for x in leaves))
    norms.append(norm)
    for t, x in zip(total, leaves, strict=True):
      t += min(1.0, clip / norm) * x[i]
  return jax.tree.unflatten(jax.tree.structure(g), total), np.array(norms)


@JIT
@pytest.mark.parametrize("clip", [5.0, 13.5, 100.0, math.inf])  # norms are 10-15
def test_clip_sums_clipped_examples_and_records_norms(clip, jit):
  g = _per_example()
  out, state = run(lambda g: _update(transforms.clip_per_example(clip), g), g, jit=jit)
  want_sum, norms_in = _clipped_sum_loop(g, clip)
  assert isinstance(out, grads.ClippedSum)
  chex.assert_trees_all_close(out.sum, want_sum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.norms_B, norms_in, rtol=1e-6)
  np.testing.assert_array_equal(out.mask_B, np.ones(B))
  np.testing.assert_allclose(state.max_norm, np.max(norms_in), rtol=1e-6)
  np.testing.assert_allclose(state.mean_norm, np.mean(norms_in), rtol=1e-6)
  np.testing.assert_allclose(state.frac_clipped, np.mean(norms_in > clip), rtol=1e-6)
  if clip == 13.5:  # some examples clipped, some not
    assert 0 < np.mean(norms_in > clip) < 1


def test_clip_leaves_small_gradients_unchanged_exactly():
  g = _per_example(scale=0.01)
  out, _ = _update(transforms.clip_per_example(10.0), g)
  chex.assert_trees_all_equal(out.sum, jax.tree.map(lambda x: jnp.sum(x, axis=0), g))


def test_clip_passes_a_clipped_sum_through():
  cs = grads.clipped_sum_from_grads(_per_example(), 0.5)
  out, state = _update(transforms.clip_per_example(0.5), cs)
  assert out is cs
  np.testing.assert_allclose(state.max_norm, np.max(cs.norms_B), rtol=1e-6)


@JIT
def test_noise_zero_sigma_is_the_mean_of_clipped(jit):
  g = _per_example()
  tx = optax.chain(
    transforms.clip_per_example(1.0),
    transforms.add_gaussian_noise(0.0, 1.0, jax.random.key(1)),
  )
  out, _ = run(lambda g: _update(tx, g), g, jit=jit)
  want_sum, _ = _clipped_sum_loop(g, 1.0)
  want = jax.tree.map(lambda c: c / B, want_sum)
  chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-7)


@JIT
def test_noise_std_is_sigma_c_over_b(jit):
  sigma, clip = 1.3, 0.7
  g = {"w": jnp.zeros((B, 200, 5))}
  params = {"w": jnp.zeros((200, 5))}

  def draw(key):
    return _update(transforms.add_gaussian_noise(sigma, clip, key), g, params)[0]["w"]

  keys = jax.random.split(jax.random.key(2), 200)
  samples = run(jax.vmap(draw), keys, jit=jit)
  std = float(jnp.std(samples))
  assert abs(std - sigma * clip / B) < 0.05 * sigma * clip / B


@JIT
def test_noise_same_key_same_bits_different_key_different(jit):
  g = _per_example()

  def draw(key):
    return _update(transforms.add_gaussian_noise(1.0, 1.0, key), g)[0]

  a = run(draw, jax.random.key(3), jit=jit)
  b = run(draw, jax.random.key(3), jit=jit)
  c = run(draw, jax.random.key(4), jit=jit)
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a["w"], c["w"])


def test_noise_differs_between_steps():
  g = _per_example()
  tx = transforms.add_gaussian_noise(1.0, 1.0, jax.random.key(5))
  state = tx.init(PARAMS)
  first, state = tx.update(g, state, PARAMS)
  second, state = tx.update(g, state, PARAMS)
  assert not np.allclose(first["w"], second["w"])
  assert int(state.count) == 2


@JIT
def test_dp_sgd_without_noise_and_huge_clip_is_sgd(jit):
  g = _per_example()
  mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)

  def both(g):
    dp, _ = _update(transforms.dp_sgd(0.1, 1e9, 0.0, jax.random.key(0)), g)
    sgd, _ = _update(optax.sgd(0.1), mean)
    return dp, sgd

  dp, sgd = run(both, g, jit=jit)
  chex.assert_trees_all_close(dp, sgd, rtol=1e-6, atol=1e-8)


def test_dp_sgd_momentum_and_dp_adam_run():
  g = _per_example()
  for tx in (
    transforms.dp_sgd(0.1, 1.0, 0.5, jax.random.key(0), momentum=0.9),
    transforms.dp_adam(0.01, 1.0, 0.5, jax.random.key(0)),
  ):
    out, _ = _update(tx, g)
    chex.assert_trees_all_equal_shapes(out, PARAMS)
    chex.assert_tree_all_finite(out)


@JIT
def test_vmap_over_clip_norms_equals_separate_runs(jit):
  g = _per_example()
  clips = jnp.array([0.1, 0.5, 1.0, 2.0, 8.0])

  def one(clip):
    return _update(transforms.dp_sgd(0.1, clip, 0.3, jax.random.key(7)), g)[0]

  batched = run(jax.vmap(one), clips, jit=jit)
  alone = jax.jit(one)  # the separate runs: one compile, not eager op by op
  for i, clip in enumerate(clips):
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, i=i: x[i], batched), alone(clip), rtol=1e-5, atol=1e-7
    )


@JIT
def test_vmap_over_noise_multipliers_equals_separate_runs(jit):
  g = _per_example()
  sigmas = jnp.array([0.0, 0.01, 0.1, 1.0, 4.0])

  def one(sigma):
    return _update(transforms.dp_adam(0.01, 1.0, sigma, jax.random.key(8)), g)[0]

  batched = run(jax.vmap(one), sigmas, jit=jit)
  alone = jax.jit(one)  # the separate runs: one compile, not eager op by op
  for i, sigma in enumerate(sigmas):
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, i=i: x[i], batched), alone(sigma), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(
  "factory,kwargs",
  [
    (transforms.dp_sgd, dict(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=0.5)),
    (transforms.dp_adam, dict(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=0.5)),
    (transforms.add_adaptive_noise, dict(noise_multiplier=0.5, steps_per_epoch=3)),
  ],
)
def test_works_under_inject_hyperparams(factory, kwargs):
  g = _per_example()
  key = jax.random.key(9)
  plain = _update(factory(**kwargs, key=key), g)[0]
  injected = optax.inject_hyperparams(factory)(**kwargs, key=key)
  state = injected.init(PARAMS)
  out, state = jax.jit(injected.update)(g, state, PARAMS)
  chex.assert_trees_all_close(out, plain, rtol=1e-5, atol=1e-7)
  # A hyperparameter changed in the state takes effect.
  state.hyperparams["noise_multiplier"] = jnp.asarray(0.0)
  out2, _ = injected.update(g, state, PARAMS)
  assert not np.allclose(out2[next(iter(out2))], out[next(iter(out))])


@JIT
def test_nan_example_is_dropped_and_counted(jit):
  g = _per_example()
  g["w"] = g["w"].at[2, 0, 0].set(jnp.nan)
  g["b"] = g["b"].at[5, 1].set(jnp.inf)
  tx = transforms.dp_sgd(0.1, 1.0, 0.0, jax.random.key(0))
  out, state = run(lambda g: _update(tx, g), g, jit=jit)
  chex.assert_tree_all_finite(out)
  assert int(state[0].num_nonfinite) == 2
  # The update is what the finite examples give (dropped ones contribute zero).
  keep = jnp.array([1, 1, 0, 1, 1, 0, 1, 1], jnp.float32)
  clean = jax.tree.map(lambda x: jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)) > 0, x, 0), g)
  want, _ = _update(transforms.dp_sgd(0.1, 1.0, 0.0, jax.random.key(0)), clean)
  chex.assert_trees_all_close(out, want, rtol=1e-6)
  _, noise_state = _update(transforms.add_gaussian_noise(1.0, 1.0, jax.random.key(0)), g)
  assert int(noise_state.num_nonfinite) == 2


def test_adaptive_noise_follows_previous_epoch_mean_norm():
  steps_per_epoch = 3
  sigma = 0.5
  tx = transforms.add_adaptive_noise(sigma, steps_per_epoch, jax.random.key(0))
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  seen = []
  epoch_means = []
  for step in range(9):
    g = _per_example(key=step, scale=1.0 + step)
    norms = np.asarray(grads.per_example_norms(g))
    _, state = update(g, state, PARAMS)
    epoch = step // steps_per_epoch
    if epoch == 0:
      seen.append(norms)
      want = sigma * np.mean(np.concatenate(seen))
    else:
      want = sigma * epoch_means[epoch - 1]
    np.testing.assert_allclose(state.noise_std, want, rtol=1e-5)
    if step % steps_per_epoch == 0:
      current = [norms]
    else:
      current.append(norms)
    if step % steps_per_epoch == steps_per_epoch - 1:
      epoch_means.append(np.mean(np.concatenate(current)))


def test_adaptive_noise_with_nan_stays_finite():
  g = _per_example()
  g["w"] = g["w"].at[0].set(jnp.nan)
  tx = transforms.add_adaptive_noise(1.0, 2, jax.random.key(0))
  out, state = _update(tx, g)
  chex.assert_tree_all_finite(out)
  assert int(state.num_nonfinite) == 1
  assert np.isfinite(state.noise_std)


def test_transforms_accept_a_clipped_sum():
  g = _per_example()
  clipped = grads.clipped_sum_from_grads(g, 1.0)
  key = jax.random.key(3)
  via_sum, state = _update(transforms.dp_sgd(0.1, 1.0, 0.7, key), clipped)
  via_pe, _ = _update(transforms.dp_sgd(0.1, 1.0, 0.7, key), g)
  chex.assert_trees_all_close(via_sum, via_pe, rtol=1e-5, atol=1e-7)
  assert float(state[0].max_norm) > 1.0


def test_key_is_required():
  with pytest.raises(TypeError):
    transforms.add_gaussian_noise(1.0, 1.0)  # pylint: disable=no-value-for-parameter


def _noise_chains(clip, sigma):
  return {
    "gaussian": optax.chain(
      transforms.clip_per_example(clip),
      transforms.add_gaussian_noise(sigma, clip, jax.random.key(1)),
    ),
    "adaptive": optax.chain(
      transforms.clip_per_example(clip),
      transforms.add_adaptive_noise(sigma, 1, jax.random.key(1)),
    ),
  }


@JIT
@pytest.mark.parametrize("kind", ["gaussian", "adaptive"])
@pytest.mark.parametrize("clip", [0.7, math.inf])
def test_zero_sigma_is_exactly_no_noise_for_any_clip(clip, kind, jit):
  # sigma * C with C = inf and sigma = 0 is NaN; sigma = 0 must mean no noise.
  g = _per_example()
  out, state = run(lambda g: _update(_noise_chains(clip, 0.0)[kind], g), g, jit=jit)
  clipped, _ = _update(transforms.clip_per_example(clip), g)
  want = jax.tree.map(lambda c: c / B, clipped.sum)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_close(out, want, rtol=1e-6, atol=1e-7)
  if clip == math.inf:
    mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)
    chex.assert_trees_all_close(out, mean, rtol=1e-6, atol=1e-7)
  if kind == "adaptive":
    assert float(state[1].noise_std) == 0.0


@JIT
def test_zero_sigma_infinite_clip_traced_in_a_grid(jit):
  # The hyperparameters stay traceable: one vmapped grid mixes C = inf rows with finite ones.
  g = _per_example()
  clips = jnp.array([math.inf, 1.0, math.inf])
  sigmas = jnp.array([0.0, 0.0, 0.5])

  def one(clip, sigma):
    out, _ = _update(_noise_chains(clip, sigma)["gaussian"], g)
    return out

  batched = run(jax.vmap(one), clips, sigmas, jit=jit)
  mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], batched), mean, rtol=1e-6, atol=1e-7)
  chex.assert_tree_all_finite(jax.tree.map(lambda x: x[:2], batched))
  # sigma > 0 with C = inf asks for infinite noise: not finite, by design.
  assert not np.all(np.isfinite(batched["w"][2]))


@JIT
def test_dp_sgd_and_dp_adam_with_infinite_clip_and_zero_sigma_are_plain(jit):
  g = _per_example()
  mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)

  def pairs(g):
    key = jax.random.key(0)
    dp_sgd, _ = _update(transforms.dp_sgd(0.1, math.inf, 0.0, key), g)
    dp_adam, _ = _update(transforms.dp_adam(0.01, math.inf, 0.0, key), g)
    sgd, _ = _update(optax.sgd(0.1), mean)
    adam, _ = _update(optax.adam(0.01), mean)
    return (dp_sgd, dp_adam), (sgd, adam)

  got, want = run(pairs, g, jit=jit)
  chex.assert_tree_all_finite(got)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
