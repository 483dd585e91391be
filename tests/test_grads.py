"""Tests jaxshape/grads.py: per-example gradients and norms against a Python loop."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import grads
from jaxshape import models
from tests.helpers import run

CASES = {
  "lr": (models.LR(num_classes=3), (6, 6, 1)),
  "mlp": (models.MLP(num_classes=4, hidden=(16,)), (6, 6, 1)),
  "cnn": (models.CNN(num_classes=3, hidden=8), (8, 8, 2)),
}


def _problem(name, batch=5):
  model, shape = CASES[name]
  key_p, key_x, key_y = jax.random.split(jax.random.key(0), 3)
  params = models.init_params(model, key_p, shape)
  x = jax.random.uniform(key_x, (batch, *shape))
  y = jax.random.randint(key_y, (batch,), 0, model.num_classes)
  return models.ClassifierLoss(model), params, {"x": x, "y": y}


def _loop_grads(loss_fn, params, batch):
  n = batch["x"].shape[0]
  grad_fn = jax.jit(jax.grad(loss_fn))
  singles = [grad_fn(params, jax.tree.map(lambda a, i=i: a[i : i + 1], batch)) for i in range(n)]
  return jax.tree.map(lambda *g: jnp.stack(g), *singles)


@functools.cache
def _problem_and_loop_grads(name):
  """(loss, params, batch, loop reference): computed once for the jit and eager cases."""
  loss_fn, params, batch = _problem(name)
  return loss_fn, params, batch, _loop_grads(loss_fn, params, batch)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_per_example_grads_match_loop(name, jit):
  loss_fn, params, batch, want = _problem_and_loop_grads(name)
  got = run(lambda p, b: grads.per_example_grads(loss_fn, p, b), params, batch, jit=jit)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  norms = run(grads.per_example_norms, got, jit=jit)
  want_norms = [
    np.sqrt(sum(np.sum(np.square(g[i])) for g in jax.tree.leaves(want))) for i in range(5)
  ]
  np.testing.assert_allclose(norms, want_norms, rtol=1e-5)


def test_per_example_grads_shapes_follow_params():
  loss_fn, params, batch = _problem("mlp", batch=7)
  got = grads.per_example_grads(loss_fn, params, batch)
  chex.assert_trees_all_equal_shapes(got, jax.tree.map(lambda p: jnp.zeros((7, *p.shape)), params))


def test_per_example_grads_any_pure_loss():
  def loss(w, batch):
    return jnp.mean((batch["x"] @ w - batch["t"]) ** 2)

  x = jnp.arange(12.0).reshape(4, 3)
  t = jnp.arange(4.0)
  w = jnp.ones(3)
  got = grads.per_example_grads(loss, w, {"x": x, "t": t})
  want = 2 * (x @ w - t)[:, None] * x
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_masked_examples_have_zero_gradient_and_are_left_out_of_the_sum():
  loss_fn, params, batch = _problem("mlp")
  batch["mask"] = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0])
  pe = grads.per_example_grads(loss_fn, params, batch)
  norms = grads.per_example_norms(pe)
  assert float(norms[1]) == 0.0 and float(norms[4]) == 0.0
  clipped = grads.clipped_sum_from_grads(pe, 1e6, batch["mask"])
  np.testing.assert_array_equal(clipped.mask_B, batch["mask"])
  want = jax.tree.map(lambda g: jnp.sum(g, axis=0), pe)
  chex.assert_trees_all_close(clipped.sum, want, rtol=1e-5, atol=1e-7)


def test_clip_factors():
  norms = jnp.array([0.0, 0.5, 1.0, 4.0])
  np.testing.assert_allclose(grads.clip_factors(norms, 1.0), [1.0, 1.0, 1.0, 0.25])
