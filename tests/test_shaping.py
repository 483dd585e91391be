"""Tests jaxshape/shaping.py: centered clipping, cosine gating, trimmed mean, median, quantile
clipping against NumPy loops; vmap / inject_hyperparams; NaN examples; the fast path
(`per_example.reweighted_sum`) and the shaping defenses of `train`."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxshape import models
from jaxshape import per_example
from jaxshape import shaping
from jaxshape import train
from tests.helpers import run

B = 8
PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])


def _per_example(key=0, scale=3.0, shift=0.0):
  kw, kb = jax.random.split(jax.random.key(key))
  return {
    "b": shift + scale * jax.random.normal(kb, (B, 3)),
    "w": shift + scale * jax.random.normal(kw, (B, 4, 3)),
  }


def _flat(g):
  """[B, K] float64 rows (leaves in tree order)."""
  return np.concatenate([np.asarray(x, np.float64).reshape(B, -1) for x in jax.tree.leaves(g)], 1)


def _unflat(v, like=PARAMS):
  leaves, out, i = jax.tree.leaves(like), [], 0
  for p in leaves:
    out.append(v[i : i + p.size].reshape(p.shape))
    i += p.size
  return jax.tree.unflatten(jax.tree.structure(like), out)


def _ref_centered(rows, r, tau):
  return sum(r + min(1.0, tau / max(np.linalg.norm(x - r), 1e-30)) * (x - r) for x in rows)


def _ref_cosine(rows, r, kappa, clip):
  total = np.zeros(rows.shape[1])
  for x in rows:
    n = np.linalg.norm(x)
    cos = 1.0 if np.linalg.norm(r) == 0 else x @ r / (n * np.linalg.norm(r))
    if cos >= kappa:
      total += min(1.0, clip / n) * x
  return total


def _ref_trimmed(rows, beta):
  n = len(rows)
  m = min(int(np.floor(beta * n)), (n - 1) // 2)
  s = np.sort(rows, axis=0)
  return s[m : n - m].mean(0)


def _update(tx, g):
  return tx.update(g, tx.init(PARAMS), PARAMS)


def _two_steps(tx, g1, g2, jit):
  """Two updates; returns (first out, second out, state after the first)."""

  def fn(g1, g2):
    s0 = tx.init(PARAMS)
    o1, s1 = tx.update(g1, s0, PARAMS)
    o2, _ = tx.update(g2, s1, PARAMS)
    return o1, o2, s1

  return run(fn, g1, g2, jit=jit)


@JIT
@pytest.mark.parametrize("tau,beta", [(1.0, 0.9), (4.0, 0.0), (math.inf, 0.5)])
def test_centered_clip_matches_numpy(tau, beta, jit):
  g1, g2 = _per_example(0), _per_example(1, shift=1.0)
  o1, o2, _ = _two_steps(shaping.centered_clip(tau, beta), g1, g2, jit)
  r0 = np.zeros(15)
  want1 = _ref_centered(_flat(g1), r0, tau)
  r1 = (1 - beta) * want1 / B
  want2 = _ref_centered(_flat(g2), r1, tau)
  chex.assert_trees_all_close(o1.sum, _unflat(want1), rtol=2e-4, atol=2e-4)
  chex.assert_trees_all_close(o2.sum, _unflat(want2), rtol=2e-4, atol=2e-4)


@JIT
@pytest.mark.parametrize("kappa,clip", [(0.0, 2.0), (-1.0, math.inf), (0.3, 5.0)])
def test_cosine_gate_matches_numpy(kappa, clip, jit):
  g1, g2 = _per_example(0, shift=0.5), _per_example(1, shift=0.5)
  o1, o2, _ = _two_steps(shaping.cosine_gate(kappa, clip, 0.5), g1, g2, jit)
  want1 = _ref_cosine(_flat(g1), np.zeros(15), kappa, clip)
  want2 = _ref_cosine(_flat(g2), 0.5 * want1 / B, kappa, clip)
  chex.assert_trees_all_close(o1.sum, _unflat(want1), rtol=2e-4, atol=2e-4)
  chex.assert_trees_all_close(o2.sum, _unflat(want2), rtol=2e-4, atol=2e-4)


@JIT
@pytest.mark.parametrize("beta", [0.0, 0.125, 0.3, 0.49])
def test_trimmed_mean_matches_numpy(beta, jit):
  g = _per_example(2)
  out, _ = run(lambda g: _update(shaping.trimmed_mean(beta), g), g, jit=jit)
  chex.assert_trees_all_close(
    out.sum, _unflat(B * _ref_trimmed(_flat(g), beta)), rtol=1e-5, atol=1e-5
  )


@JIT
def test_median_matches_numpy(jit):
  g = _per_example(3)
  out, state = run(lambda g: _update(shaping.coordinate_median(), g), g, jit=jit)
  chex.assert_trees_all_close(out.sum, _unflat(B * np.median(_flat(g), 0)), rtol=1e-5, atol=1e-5)
  assert float(state.num_kept) == B


@JIT
@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.9])
def test_quantile_clip_matches_numpy(gamma, jit):
  g1, g2 = _per_example(0), _per_example(1)
  c0 = 8.0
  o1, o2, s1 = _two_steps(shaping.quantile_clip(gamma, c0, 0.2), g1, g2, jit)
  n1 = np.linalg.norm(_flat(g1), axis=1)
  c1 = c0 * np.exp(-0.2 * (np.mean(n1 <= c0) - gamma))
  np.testing.assert_allclose(s1.l2_norm_clip, c1, rtol=1e-5)
  rows = _flat(g2)
  want2 = sum(min(1.0, c1 / np.linalg.norm(x)) * x for x in rows)
  chex.assert_trees_all_close(o2.sum, _unflat(want2), rtol=1e-4, atol=1e-4)


def test_quantile_clip_converges_to_the_quantile():
  norms = np.linspace(1.0, 10.0, B)
  g = {
    "b": jnp.zeros((B, 3)),
    "w": jnp.asarray(np.zeros((B, 4, 3)) + norms[:, None, None] / np.sqrt(12)),
  }
  tx = shaping.quantile_clip(0.5, 100.0, 0.2)
  state = tx.init(PARAMS)
  step = jax.jit(lambda s: tx.update(g, s, PARAMS)[1])
  for _ in range(200):
    state = step(state)
  assert norms[3] - 0.3 <= float(state.l2_norm_clip) <= norms[4] + 0.3


FACTORIES = {
  "centered": lambda h: shaping.centered_clip(h),
  "cosine": lambda h: shaping.cosine_gate((h - 2.5) / 2.0, 2.0),
  "trimmed": lambda h: shaping.trimmed_mean(h / 10.0),
  "quantile": lambda h: shaping.quantile_clip(0.5, h),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_vmap_over_hyperparameter_equals_each(name):
  g1, g2 = _per_example(0, shift=0.5), _per_example(1, shift=0.5)
  hs = jnp.asarray([1.0, 2.5, 4.0])

  def two(h):
    tx = FACTORIES[name](h)
    s = tx.init(PARAMS)
    _, s = tx.update(g1, s, PARAMS)
    return tx.update(g2, s, PARAMS)[0].sum

  got = jax.jit(jax.vmap(two))(hs)
  for i, h in enumerate([1.0, 2.5, 4.0]):
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], got), two(h), rtol=1e-5, atol=1e-5)


def test_inject_hyperparams():
  g = _per_example(0)
  tx = optax.inject_hyperparams(shaping.centered_clip)(radius=2.0, reference_decay=0.5)
  state = tx.init(PARAMS)
  out, state = jax.jit(tx.update)(g, state, PARAMS)
  chex.assert_trees_all_close(
    out.sum, _unflat(_ref_centered(_flat(g), np.zeros(15), 2.0)), rtol=2e-4
  )
  state.hyperparams["radius"] = jnp.asarray(0.5)
  out, _ = jax.jit(tx.update)(g, state, PARAMS)
  r = 0.5 * _ref_centered(_flat(g), np.zeros(15), 2.0) / B
  chex.assert_trees_all_close(
    out.sum, _unflat(_ref_centered(_flat(g), r, 0.5)), rtol=2e-4, atol=2e-4
  )


ALL = {
  "centered": lambda: shaping.centered_clip(2.0),
  "cosine": lambda: shaping.cosine_gate(0.0, 2.0),
  "trimmed": lambda: shaping.trimmed_mean(0.2),
  "median": shaping.coordinate_median,
  "quantile": lambda: shaping.quantile_clip(0.5, 2.0),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_nan_example_is_dropped_and_counted(name):
  g = _per_example(4)
  bad = jax.tree.map(lambda x: x.at[3].set(jnp.nan), g)
  tx = ALL[name]()
  out, state = jax.jit(tx.update)(bad, tx.init(PARAMS), PARAMS)
  assert int(state.num_nonfinite) == 1
  assert float(out.mask_B[3]) == 0.0 and float(jnp.sum(out.mask_B)) == B - 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out.sum))
  # The same as the batch without example 3 (for the robust means: scaled to B examples).
  keep = np.array([i != 3 for i in range(B)])
  rows = _flat(g)[keep]
  if name in ("trimmed", "median"):
    want = B * (_ref_trimmed(rows, 0.2) if name == "trimmed" else np.median(rows, 0))
    chex.assert_trees_all_close(out.sum, _unflat(want), rtol=1e-5, atol=1e-5)
  else:
    masked = shaping.MaskedGrads(
      jax.tree.map(
        lambda x: jnp.where(jnp.asarray(keep).reshape((B,) + (1,) * (x.ndim - 1)), x, 0.0), g
      ),
      jnp.asarray(keep, jnp.float32),
    )
    want, _ = tx.update(masked, tx.init(PARAMS), PARAMS)
    chex.assert_trees_all_close(out.sum, want.sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: shaping.centered_clip(0.0), "radius"),
    (lambda: shaping.centered_clip(1.0, 1.0), "reference_decay"),
    (lambda: shaping.cosine_gate(1.5), "threshold"),
    (lambda: shaping.cosine_gate(0.0, -1.0), "l2_norm_clip"),
    (lambda: shaping.trimmed_mean(0.5), "trim_fraction"),
    (lambda: shaping.quantile_clip(1.5), "target_quantile"),
    (lambda: shaping.quantile_clip(0.5, math.inf), "initial_clip"),
    (lambda: shaping.quantile_clip(0.5, 1.0, 0.0), "adapt_rate"),
    (lambda: shaping.for_defense("nope", 1.0, 0.0), "defense"),
    (lambda: train.HParams.create(0.1, 1.0, 0.0, 2.0), "shaping_param"),
  ],
)
def test_invalid_arguments_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_aggregated_gradient_raises():
  with pytest.raises(ValueError, match="batch axis"):
    shaping.centered_clip(1.0).update(PARAMS, shaping.centered_clip(1.0).init(PARAMS), PARAMS)


# ------------------------------------------------------------------ fast path and train

LOSS = models.ClassifierLoss(models.MLP(3, hidden=(5,)))


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(24, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 24), jnp.int32)
  params = models.init_params(LOSS.model, jax.random.key(0), (6,))
  return params, {"x": x, "y": y}


def test_fast_reweighted_sum_equals_vmap(problem):
  params, data = problem
  batch = dict(data, mask=jnp.asarray([1.0] * 20 + [0.0] * 4))
  ref = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  fn = lambda n, d: shaping.centered_clip_weights(n, d, 2.0, 0.5)
  fast = jax.jit(lambda p, b, r: per_example.reweighted_sum(LOSS, p, b, r, fn, method="fast"))
  slow = jax.jit(lambda p, b, r: per_example.reweighted_sum(LOSS, p, b, r, fn, method="vmap"))
  a, b = fast(params, batch, ref), slow(params, batch, ref)
  chex.assert_trees_all_close(a.sum, b.sum, rtol=1e-4, atol=1e-5)
  for f in ("dots_B", "mask_B", "weights_B"):
    np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(a.norms_B[:20], b.norms_B[:20], rtol=1e-4)


def _fit(defense, hp, data, epochs=2):
  spec = train.TrainSpec(LOSS, optimizer="sgd", defense=defense, batch_size=10, epochs=epochs)
  return jax.jit(train.fit, static_argnums=0)(spec, hp, jax.random.key(1), data)


@pytest.mark.parametrize(
  "defense,clip,param",
  [("centered", math.inf, 0.5), ("trimmed", math.inf, 0.0), ("cosine", math.inf, -1.0)],
)
def test_train_defense_reduces_to_plain_sgd(problem, defense, clip, param):
  """tau = inf, trim 0 and kappa = -1 shape nothing: the run equals vanilla's."""
  _, data = problem
  plain = _fit("vanilla", train.HParams.create(0.3), data)
  shaped = _fit(defense, train.HParams.create(0.3, clip, 0.0, param), data)
  chex.assert_trees_all_close(shaped.params, plain.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("defense", ["centered", "cosine", "median", "quantile"])
def test_train_defense_runs_and_records(problem, defense):
  _, data = problem
  result = _fit(defense, train.HParams.create(0.3, 1.0, 0.0, 0.5), data)
  assert np.all(np.isfinite(result.records["train_loss"]))
  assert np.all(np.isfinite(result.records["norm_mean"]))
