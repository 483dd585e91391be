"""Tests jaxshape/poisons/frogs.py: Poison Frogs feature collision.

Crafting works (the feature distance to the target falls, the poison stays
nearer its base than the target is, pixels stay in [0, 1], labels stay
clean), the result is sorted for the multi-poison protocol, the host and
`while_loop` drivers agree, candidates are the nearest in feature space, and
on a small two-class problem 20 collision poisons flip a target after
end-to-end fine-tuning where the same bases merely watermarked do not.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models
from jaxshape import poisons
from jaxshape import train

MODEL = models.MLP(2, hidden=(32,))
SPEC = train.TrainSpec(models.ClassifierLoss(MODEL), "sgd", batch_size=50, epochs=30)


@functools.partial(jax.jit, static_argnums=1)
def _images(key, n, noise=0.25):
  """Two fixed random 8x8 templates plus pixel noise, clipped to [0, 1]."""
  y = (jnp.arange(n) % 2).astype(jnp.int32)
  templates = jax.random.uniform(jax.random.key(7), (2, 8, 8, 1))
  return jnp.clip(templates[y] + noise * jax.random.normal(key, (n, 8, 8, 1)), 0.0, 1.0), y


@functools.partial(jax.jit, static_argnums=0)
def _pretrain(spec, data, key):
  return train.fit(spec, train.HParams.create(0.1), key, data).params


@pytest.fixture(scope="module")
def problem():
  x, y = _images(jax.random.key(0), 300)
  x_test, y_test = _images(jax.random.key(1), 300)
  params = _pretrain(SPEC, {"x": x, "y": y}, jax.random.key(2))
  pred = np.asarray(train.predictions(MODEL, params, x_test))
  # Targets: the first test points of class 1 the clean model gets right.
  targets = np.flatnonzero((pred == 1) & (np.asarray(y_test) == 1))[:3]
  return x, y, x_test, y_test, params, targets


@pytest.fixture(scope="module")
def crafted(problem):
  _, _, x_test, y_test, params, targets = problem
  t = int(targets[0])
  idx_K, _ = poisons.nearest_candidates(MODEL, params, x_test[t], x_test, y_test, 0, 8)
  ps = poisons.poison_frogs(
    MODEL,
    params,
    x_test[t],
    x_test,
    y_test,
    idx_K,
    target_idx=t,
    max_iters=300,
    learning_rate=0.05,
    max_feature_distance=np.inf,
  )
  return t, idx_K, ps


def test_feature_distance_falls_and_poisons_stay_near_their_base(problem, crafted):
  _, _, x_test, y_test, params, _ = problem
  t, idx_K, ps = crafted
  assert len(ps) == 8 and ps.attack == "poison_frogs"
  final, initial = (
    np.asarray(ps.info["feature_distance_P"]),
    np.asarray(ps.info["initial_feature_distance_P"]),
  )
  assert np.all(final < 0.2 * initial)
  # Recomputed from the poisons themselves.
  f_t = models.features(MODEL, params, x_test[t][None])
  recomputed = np.linalg.norm(np.asarray(models.features(MODEL, params, ps.x) - f_t), axis=1)
  np.testing.assert_allclose(recomputed, final, rtol=1e-4, atol=1e-5)
  base = np.asarray(x_test)[np.asarray(ps.base_idx)]
  input_dist = np.linalg.norm((np.asarray(ps.x) - base).reshape(8, -1), axis=1)
  np.testing.assert_allclose(ps.info["input_distance_P"], input_dist, rtol=1e-5)
  target_dist = np.linalg.norm((np.asarray(x_test[t])[None] - base).reshape(8, -1), axis=1)
  assert np.all(input_dist < 0.9 * target_dist)  # bounded: nearer its base than the target is
  assert float(ps.x.min()) >= 0.0 and float(ps.x.max()) <= 1.0
  np.testing.assert_array_equal(ps.y, np.asarray(y_test)[np.asarray(ps.base_idx)])  # clean label
  np.testing.assert_array_equal(ps.y, 0)
  assert ps.target_class == 0
  np.testing.assert_array_equal(ps.target_idx, t)
  assert sorted(np.asarray(ps.base_idx).tolist()) == sorted(np.asarray(idx_K).tolist())


def test_poisons_are_sorted_and_filtered_by_feature_distance(problem, crafted):
  _, _, x_test, y_test, params, _ = problem
  t, idx_K, ps = crafted
  d = np.asarray(ps.info["feature_distance_P"])
  assert np.all(np.diff(d) >= 0)
  bound = float(np.median(d))
  kept = poisons.poison_frogs(
    MODEL,
    params,
    x_test[t],
    x_test,
    y_test,
    idx_K,
    max_iters=300,
    learning_rate=0.05,
    max_feature_distance=bound,
  )
  assert len(kept) == int(np.sum(d <= bound))
  assert bool(jnp.all(kept.info["accepted_P"]))
  np.testing.assert_array_equal(kept.base_idx, ps.base_idx[: len(kept)])
  np.testing.assert_array_equal(kept.first(2).x, ps.x[:2])


def test_host_loop_matches_while_loop(problem, crafted):
  _, _, x_test, y_test, params, _ = problem
  t, idx_K, ps = crafted
  host = poisons.poison_frogs(
    MODEL,
    params,
    x_test[t],
    x_test,
    y_test,
    idx_K,
    max_iters=300,
    learning_rate=0.05,
    max_feature_distance=np.inf,
    loop="host",
  )
  np.testing.assert_array_equal(host.base_idx, ps.base_idx)
  np.testing.assert_allclose(host.x, ps.x, atol=1e-5)


def test_stop_distance_freezes_finished_candidates(problem, crafted):
  _, _, x_test, y_test, params, _ = problem
  t, idx_K, ps = crafted
  stop = float(np.median(np.asarray(ps.info["initial_feature_distance_P"]))) / 2
  early = poisons.poison_frogs(
    MODEL,
    params,
    x_test[t],
    x_test,
    y_test,
    idx_K,
    max_iters=300,
    learning_rate=0.05,
    stop_distance=stop,
    max_feature_distance=np.inf,
  )
  iters = np.asarray(early.info["iterations_P"])
  assert np.all(iters < 300) and np.all(iters > 0)
  # Each stopped within one step of crossing the threshold.
  assert np.all(np.asarray(early.info["feature_distance_P"]) < stop)


def test_nearest_candidates_against_numpy(problem):
  _, _, x_test, y_test, params, targets = problem
  t = int(targets[1])
  idx_K, dist_K = poisons.nearest_candidates(MODEL, params, x_test[t], x_test, y_test, 0, 5)
  f = np.asarray(models.features(MODEL, params, x_test))
  d = np.linalg.norm(f - f[t], axis=1)
  d[np.asarray(y_test) != 0] = np.inf
  np.testing.assert_array_equal(idx_K, np.argsort(d, kind="stable")[:5])
  np.testing.assert_allclose(dist_K, np.sort(d)[:5], rtol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _fine_tune_predictions(spec, params, data_V, x_V, key):
  """Fine-tunes `params` on each data variant (vmapped); predicts x_V[v] after each."""
  hparams = train.HParams.create(0.1)

  def one(d, x):
    tuned = train.fit(spec, hparams, key, d, init_params=params).params
    return models.predict(spec.model, tuned, x[None])[0]

  return jax.vmap(one)(data_V, x_V)


def test_collision_poisons_flip_targets_after_fine_tuning(problem):
  x, y, x_test, y_test, params, targets = problem
  variants, target_x = [], []
  for t in targets:
    idx_K, _ = poisons.nearest_candidates(MODEL, params, x_test[t], x_test, y_test, 0, 20)
    craft = functools.partial(
      poisons.poison_frogs,
      MODEL,
      params,
      x_test[t],
      x_test,
      y_test,
      idx_K,
      learning_rate=0.05,
      watermark=0.3,
      max_feature_distance=np.inf,
    )
    frogs, watermarked = craft(max_iters=300), craft(max_iters=0)
    variants += [
      poisons.merge((x, y), frogs, num_active=0),  # clean fine-tuning
      poisons.merge((x, y), watermarked, num_active=len(watermarked)),
      poisons.merge((x, y), frogs, num_active=len(frogs)),
    ]
    target_x += [x_test[t]] * 3
  data_V = jax.tree.map(lambda *a: jnp.stack(a), *variants)
  pred = np.asarray(
    _fine_tune_predictions(SPEC, params, data_V, jnp.stack(target_x), jax.random.key(5))
  ).reshape(len(targets), 3)
  clean, watermark_only, collision = pred.T
  np.testing.assert_array_equal(clean, 1)  # targets stay correct without poisons
  assert np.sum(collision == 0) >= 2  # most targets flip to the bases' class
  assert np.sum(collision == 0) > np.sum(watermark_only == 0)


def test_collide_vmaps_over_targets(problem):
  """The pure core runs a batch of targets (each with its candidates) as one program."""
  _, _, x_test, y_test, params, targets = problem
  idx_TK = jnp.stack(
    [
      poisons.nearest_candidates(MODEL, params, x_test[t], x_test, y_test, 0, 8)[0]
      for t in targets[:2]
    ]
  )
  x_t = x_test[jnp.asarray(targets[:2])]
  craft = lambda xt, xb: poisons.collide(MODEL, params, xt, xb, 0.05, 0.1, 30)
  batched = jax.jit(jax.vmap(craft))(x_t, x_test[idx_TK])
  for i in range(2):
    alone = craft(x_t[i], x_test[idx_TK[i]])
    np.testing.assert_allclose(batched.x_K[i], alone.x_K, atol=1e-5)
    np.testing.assert_allclose(batched.distance_K[i], alone.distance_K, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(batched.distance_K) < np.asarray(batched.initial_distance_K))
