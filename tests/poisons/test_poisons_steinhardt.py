"""Tests jaxshape/poisons/sphere_slab.py: Steinhardt et al.'s attack and `feasibility`.

The poisons lie exactly in the feasible set (box, sphere and slab of their
class, centred on the poisoned centroids with clean radii), `feasibility`
agrees with an independent float64 computation, and on a small binary problem
the attack lowers a softmax regression's accuracy far more than random label
flipping with the same number of poisons.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models
from jaxshape import poisons
from jaxshape import train
from jaxshape.poisons import sphere_slab

RATIO = 0.3


@functools.partial(jax.jit, static_argnums=1)
def _blobs(key, n, d=16, noise=0.15):
  """Two Gaussian classes in [0, 1]^d (fixed means 0.35 apart per feature), clipped."""
  y = (jnp.arange(n) % 2).astype(jnp.int32)
  mean0 = jax.random.uniform(jax.random.key(42), (d,), minval=0.3, maxval=0.7)
  mean1 = mean0 + 0.175 * jnp.sign(jax.random.normal(jax.random.key(43), (d,)))
  means = jnp.stack([mean0, mean1])
  return jnp.clip(means[y] + noise * jax.random.normal(key, (n, d)), 0.0, 1.0), y


@pytest.fixture(scope="module")
def problem():
  x, y = _blobs(jax.random.key(0), 400)
  x_test, y_test = _blobs(jax.random.key(1), 1000)
  attack = poisons.steinhardt(x, y, RATIO)
  return x, y, x_test, y_test, attack


def test_poisons_are_feasible_exactly(problem):
  x, y, _, _, attack = problem
  assert len(attack) == round(RATIO * 400)
  f = poisons.feasibility(x, y, attack.x, attack.y)
  assert bool(jnp.all(f.feasible_P))
  assert float(f.sphere_P.max()) <= 1.0 and float(f.slab_P.max()) <= 1.0
  assert float(attack.x.min()) >= 0.0 and float(attack.x.max()) <= 1.0
  # Every checkpoint's candidate is feasible too, with its own poisoned centroids.
  for k in range(attack.info["x_KD"].shape[0]):
    x_k = jnp.broadcast_to(attack.info["x_KD"][k], attack.x.shape)
    y_k = jnp.full([len(attack)], attack.info["label_K"][k], jnp.int32)
    assert bool(jnp.all(poisons.feasibility(x, y, x_k, y_k).feasible_P)), k


def test_poisons_use_the_dragged_radius(problem):
  """The data-dependent defense is the point: against clean centroids they look infeasible."""
  x, y, _, _, attack = problem
  clean = poisons.feasibility(x, y, attack.x, attack.y, poisoned_centroids=False)
  assert not bool(jnp.any(clean.feasible_P))
  assert float(clean.sphere_P.max()) > 1.2


def test_poisons_concentrate_on_one_point(problem):
  _, _, _, _, attack = problem
  assert np.unique(np.asarray(attack.x).reshape(len(attack), -1), axis=0).shape[0] == 1
  assert np.unique(np.asarray(attack.y)).size == 1
  score_K = np.asarray(attack.info["score_K"])
  assert attack.config["selected_checkpoint"] == int(attack.info["checkpoint_K"][score_K.argmax()])


def test_feasibility_matches_a_float64_reference(problem):
  x, y, _, _, _ = problem
  x64, y64 = np.asarray(x, np.float64), np.asarray(y)
  rng = np.random.default_rng(0)
  x_p = rng.uniform(-0.1, 1.1, (7, 16))
  y_p = np.array([0, 1, 1, 0, 1, 0, 1])
  got = poisons.feasibility(x64.astype(np.float32), y64, x_p.astype(np.float32), y_p, quantile=0.5)
  mu = np.stack([x64[y64 == k].mean(0) for k in (0, 1)])
  radius = np.array(
    [np.quantile(np.linalg.norm(x64[y64 == k] - mu[k], axis=1), 0.5) for k in (0, 1)]
  )
  slab = np.array(
    [np.quantile(np.abs((x64[y64 == k] - mu[k]) @ (mu[1] - mu[0])), 0.5) for k in (0, 1)]
  )
  x_all, y_all = np.concatenate([x64, x_p]), np.concatenate([y64, y_p])
  mu_p = np.stack([x_all[y_all == k].mean(0) for k in (0, 1)])
  want_sphere = np.linalg.norm(x_p - mu_p[y_p], axis=1) / radius[y_p]
  want_slab = np.abs(np.sum((x_p - mu_p[y_p]) * (mu_p[1] - mu_p[0]), axis=1)) / slab[y_p]
  np.testing.assert_allclose(got.sphere_P, want_sphere, rtol=1e-4)
  np.testing.assert_allclose(got.slab_P, want_slab, rtol=1e-4, atol=1e-5)
  want_box = np.all((x_p >= 0) & (x_p <= 1), axis=1)
  np.testing.assert_array_equal(got.in_box_P, want_box)
  np.testing.assert_array_equal(got.feasible_P, want_box & (want_sphere <= 1) & (want_slab <= 1))


def test_largest_feasible_shrink_against_a_dense_scan():
  """The closed-form shrink factor is the largest feasible t on a fine grid."""
  rng = np.random.default_rng(1)
  t_T = np.linspace(0.0, 1.0, 200_001)
  for _ in range(200):
    vv = rng.uniform(0.01, 4.0)
    vd = rng.uniform(-3.0, 3.0)
    c = rng.uniform(0.3, 1.0)
    r, sl = rng.uniform(0.1, 2.0, size=2)
    got = float(sphere_slab._largest_feasible_shrink(vv, vd, c, r, sl))
    ok_T = (c * t_T * np.sqrt(vv) <= r) & (c * np.abs(t_T * vd + (1 - c) * t_T**2 * vv) <= sl)
    want = t_T[ok_T].max()
    assert got == pytest.approx(want, abs=2e-5), (vv, vd, c, r, sl)


@functools.partial(jax.jit, static_argnums=0)
def _test_accuracy(spec, data_V, x_test, y_test, key):
  """Test accuracy of an LR trained on each data variant (same shapes), vmapped."""
  hparams = train.HParams.create(0.01)

  def one(d):
    params = train.fit(spec, hparams, key, d).params
    return train.accuracy(spec.model, params, x_test, y_test)

  return jax.vmap(one)(data_V)


def test_attack_beats_label_flipping(problem):
  x, y, x_test, y_test, attack = problem
  flipped = poisons.label_flip(jax.random.key(2), x, y, RATIO)
  variants = [
    poisons.merge((x, y), attack, num_active=0),  # clean (poison rows masked out)
    poisons.merge((x, y), flipped, num_active=len(flipped)),
    poisons.merge((x, y), attack, num_active=len(attack)),
  ]
  data_V = jax.tree.map(lambda *a: jnp.stack(a), *variants)
  spec = train.TrainSpec(models.ClassifierLoss(models.LR(2)), "adam", batch_size=50, epochs=30)
  clean, lf, st = np.asarray(_test_accuracy(spec, data_V, x_test, y_test, jax.random.key(3)))
  assert clean >= 0.97
  assert clean - lf <= 0.03  # label flipping barely hurts a linear model
  assert clean - st >= 0.04  # the min-max attack does
  assert lf - st >= 0.03
