"""Tests jaxshape/poisons/gradient_matching.py: Witches' Brew.

The perturbation respects the l-infinity bound and the box exactly (as
float32 computes them), labels stay clean, the cosine alignment rises over
the steps, the reverse-over-forward gradient equals plain double-backward
autodiff (jitted and eager), the host and `lax.scan` drivers agree, and the
augmentation moves pixels without changing them; an ensemble of one model is
that model, and an ensemble's loss is its members' mean.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models
from jaxshape import poisons
from jaxshape import train
from jaxshape.poisons import gradient_matching
from tests.helpers import run

EPSILON = 8 / 255
MODEL = models.MLP(3, hidden=(32,))
SPEC = train.TrainSpec(models.ClassifierLoss(MODEL), "sgd", batch_size=50, epochs=20)


@functools.partial(jax.jit, static_argnums=1)
def _images(key, n, noise=0.2):
  y = (jnp.arange(n) % 3).astype(jnp.int32)
  templates = jax.random.uniform(jax.random.key(7), (3, 8, 8, 1), maxval=0.8)
  return jnp.clip(templates[y] + noise * jax.random.normal(key, (n, 8, 8, 1)), 0.0, 1.0), y


@functools.partial(jax.jit, static_argnums=0)
def _pretrain(spec, data, key):
  return train.fit(spec, train.HParams.create(0.1), key, data).params


@pytest.fixture(scope="module")
def problem():
  x, y = _images(jax.random.key(0), 150)
  x_test, _ = _images(jax.random.key(1), 10)
  params = _pretrain(SPEC, {"x": x, "y": y}, jax.random.key(2))
  return x, y, x_test[0], params  # x_test[0] is of class 0; the attacker wants class 2


@pytest.fixture(scope="module")
def brewed(problem):
  x, y, x_target, params = problem
  # No augmentation here: on 8x8 images a one-pixel shift is a large change.
  return poisons.witches_brew(
    jax.random.key(3),
    MODEL,
    params,
    x_target,
    2,
    x,
    y,
    budget=10,
    steps=40,
    restarts=2,
    epsilon=EPSILON,
    augment=False,
  )


def test_bound_box_and_clean_labels_hold_exactly(problem, brewed):
  x, y, _, _ = problem
  ps = brewed
  base = x[ps.base_idx]
  assert len(ps) == 10 and ps.attack == "witches_brew" and ps.target_class == 2
  assert float(jnp.max(jnp.abs(ps.x - base))) <= EPSILON  # float32, as computed
  assert float(ps.info["linf_P"].max()) <= EPSILON
  assert float(jnp.max(jnp.abs(ps.x - base))) > 0.9 * EPSILON  # the budget is used
  assert float(ps.x.min()) >= 0.0 and float(ps.x.max()) <= 1.0
  np.testing.assert_array_equal(ps.y, 2)
  np.testing.assert_array_equal(ps.y, y[ps.base_idx])  # clean labels: unchanged
  assert len(np.unique(np.asarray(ps.base_idx))) == 10


def test_alignment_rises_over_the_steps(brewed):
  alignment_RS = np.asarray(brewed.info["alignment_RS"])
  assert alignment_RS.shape == (2, 40)
  first, last = alignment_RS[:, :5].mean(axis=1), alignment_RS[:, -5:].mean(axis=1)
  assert np.all(last > first + 0.04)
  best = int(brewed.info["best_restart"])
  assert float(brewed.info["loss_R"][best]) == float(brewed.info["loss_R"].min())


@pytest.mark.parametrize(
  "name, jit", [("cnn", True), ("mlp", True), ("lr", False)], ids=["cnn-jit", "mlp-jit", "lr-eager"]
)
def test_fast_gradient_equals_double_backward(name, jit):
  model = {"cnn": models.CNN(3, hidden=8), "mlp": MODEL, "lr": models.LR(3)}[name]
  key_p, key_x, key_d = jax.random.split(jax.random.key(4), 3)
  params = models.init_params(model, key_p, (8, 8, 1))
  x = jax.random.uniform(key_x, (5, 8, 8, 1))
  x_P, y_P = x[:4], jnp.array([0, 1, 2, 2], jnp.int32)
  grad_target = poisons.target_gradient(model, params, x[4], 2)
  delta = 0.02 * jax.random.normal(key_d, x_P.shape)

  def fast(d):
    return gradient_matching.alignment_value_and_grad(
      model, params, grad_target, lambda e: x_P + e, d, y_P
    )

  def reference(d):
    return jax.value_and_grad(
      lambda e: poisons.alignment_loss(model, params, grad_target, x_P + e, y_P)
    )(d)

  loss, grad = run(fast, delta, jit=jit)
  want_loss, want_grad = run(reference, delta, jit=jit)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  chex.assert_trees_all_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_scan_and_host_loops_agree(problem):
  x, y, x_target, params = problem
  kwargs = dict(budget=4, steps=6, restarts=1, epsilon=EPSILON, max_shift=1)  # augmented
  host = poisons.witches_brew(jax.random.key(5), MODEL, params, x_target, 2, x, y, **kwargs)
  scan = poisons.witches_brew(
    jax.random.key(5), MODEL, params, x_target, 2, x, y, loop="scan", **kwargs
  )
  np.testing.assert_array_equal(host.base_idx, scan.base_idx)
  np.testing.assert_allclose(host.x, scan.x, atol=1e-6)
  np.testing.assert_allclose(host.info["alignment_RS"], scan.info["alignment_RS"], atol=1e-5)


def test_augmentation_only_moves_pixels():
  x = jax.random.uniform(jax.random.key(6), (16, 6, 6, 1))
  flipped = poisons.augment_images(jax.random.key(7), x, 0, True)
  same = np.all(np.asarray(flipped == x), axis=(1, 2, 3))
  mirrored = np.all(np.asarray(flipped == x[:, :, ::-1]), axis=(1, 2, 3))
  assert np.all(same | mirrored) and same.any() and mirrored.any()
  shifted = np.asarray(poisons.augment_images(jax.random.key(8), x, 2, False))
  for i in range(16):  # each is a translate of its image with zero fill
    found = False
    for dy in range(-2, 3):
      for dx in range(-2, 3):
        want = np.zeros((10, 10, 1), np.float32)
        want[2:8, 2:8] = np.asarray(x[i])
        found |= np.array_equal(shifted[i], want[2 + dy : 8 + dy, 2 + dx : 8 + dx])
    assert found, i


def test_ensemble_of_one_is_the_model_and_loss_is_the_members_mean(problem):
  x, y, x_target, params = problem
  kwargs = dict(budget=4, steps=5, restarts=1, epsilon=EPSILON, augment=False)
  one = poisons.witches_brew(jax.random.key(9), MODEL, params, x_target, 2, x, y, **kwargs)
  listed = poisons.witches_brew(jax.random.key(9), MODEL, [params], x_target, 2, x, y, **kwargs)
  np.testing.assert_allclose(one.x, listed.x, atol=1e-6)
  other = jax.tree.map(lambda a: 0.5 * a, params)
  pair = poisons.witches_brew(
    jax.random.key(9), MODEL, [params, other], x_target, 2, x, y, **kwargs
  )
  grads = poisons.target_gradient(MODEL, [params, other], x_target, 2)
  assert isinstance(grads, tuple) and len(grads) == 2
  each = [
    float(poisons.alignment_loss(MODEL, p, g, pair.x, pair.y))
    for p, g in zip([params, other], grads, strict=True)
  ]
  np.testing.assert_allclose(float(pair.info["loss_R"][0]), np.mean(each), rtol=1e-4)
