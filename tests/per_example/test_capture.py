"""Tests jaxshape/per_example/_capture.py and the public checks: BatchNorm, fallback, methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshape
from jaxshape import models
from jaxshape import per_example
from tests.per_example import zoo


def _setup(model):
  params = model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 1)))["params"]
  batch = {"x": jnp.ones((3, 12, 12, 1)), "y": jnp.array([0, 1, 2])}
  return models.ClassifierLoss(model), params, batch


def test_batchnorm_in_training_mode_is_rejected_naming_the_layer():
  model = zoo.WithBatchNorm()
  variables = model.init(jax.random.key(0), jnp.zeros((2, 12, 12, 1)))
  loss_fn = models.ClassifierLoss(model)
  batch = {"x": jnp.ones((3, 12, 12, 1)), "y": jnp.array([0, 1, 2])}
  with pytest.raises(ValueError, match=r"'bn'.*GroupNorm"):
    jaxshape.clipped_sum_and_norms(loss_fn, variables["params"], batch, 1.0)


def test_method_is_validated_and_fast_needs_a_per_example_loss():
  loss_fn, params, batch = _setup(models.LR(num_classes=3))
  with pytest.raises(ValueError, match="method must be one of"):
    jaxshape.clipped_sum_and_norms(loss_fn, params, batch, 1.0, method="ghost")
  plain = lambda p, b: loss_fn(p, b)  # noqa: E731
  with pytest.raises(ValueError, match="PerExampleLoss"):
    jaxshape.clipped_sum_and_norms(plain, params, batch, 1.0, method="fast")
  auto = jaxshape.clipped_sum_and_norms(plain, params, batch, 1.0)  # falls back to vmap
  fast = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, 1.0)
  np.testing.assert_allclose(auto.norms_B, fast.norms_B, rtol=1e-5)


def test_user_per_example_loss_takes_the_engine():
  model = models.LR(num_classes=1)

  def squared_error(pred_B1, batch):
    return jnp.square(pred_B1[:, 0] - batch["t"])

  loss_fn = per_example.PerExampleLoss(model, squared_error)
  params = models.init_params(model, jax.random.key(0), (5,))
  batch = {"x": jnp.arange(15.0).reshape(3, 5) / 10, "t": jnp.array([0.0, 1.0, -1.0])}
  fast = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, 0.5, method="fast")
  ref = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, 0.5, method="vmap")
  np.testing.assert_allclose(fast.norms_B, ref.norms_B, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(fast.sum), jax.tree.leaves(ref.sum), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5)
