"""Tests jaxshape/models.py: shapes of the paper's models and the loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models


@pytest.mark.parametrize(
  "name,shape,kwargs,n_features",
  [
    ("lr", (28, 28, 1), {}, 784),
    ("mlp", (28, 28, 1), {}, 256),
    ("mlp", (28, 28, 1), {"hidden": (256, 256)}, 256),
    ("cnn", (28, 28, 1), {}, 64),
    ("cnn", (32, 32, 3), {}, 64),
    ("cnn", (28, 28, 1), {"padding": "SAME", "hidden": 256}, 256),
    ("resnet18", (8, 8, 3), {"width": 4, "num_groups": 2}, 32),
  ],
)
def test_shapes(name, shape, kwargs, n_features):
  model = models.make_model(name, 10, **kwargs)
  # An "rbg" key: XLA on the CPU compiles each threefry draw of an initializer
  # (per parameter shape) in about 0.5 s; ResNet-18's init took 22 s of CPU
  # with threefry, 6 s with rbg (measured).
  params = models.init_params(model, jax.random.key(0, impl="rbg"), shape)
  x = jnp.zeros((3, *shape))
  assert model.apply({"params": params}, x).shape == (3, 10)
  assert models.features(model, params, x).shape == (3, n_features)
  assert models.predict(model, params, x).dtype == jnp.int32


def test_cnn_matches_table_4():
  params = models.init_params(models.CNN(10), jax.random.key(0), (28, 28, 1))
  assert params["conv_0"]["kernel"].shape == (3, 3, 1, 16)
  assert params["conv_1"]["kernel"].shape == (3, 3, 16, 32)
  assert params["dense_0"]["kernel"].shape == (12 * 12 * 32, 64)
  assert not np.any(params["dense_0"]["bias"])


def test_loss_masks_and_weights():
  model = models.LR(3)
  params = models.init_params(model, jax.random.key(0), (4,))
  x = jax.random.normal(jax.random.key(1), (4, 4))
  y = jnp.array([0, 1, 2, 0])
  loss_fn = models.ClassifierLoss(model)
  per = loss_fn.per_example(params, {"x": x, "y": y})
  masked = loss_fn(params, {"x": x, "y": y, "mask": jnp.array([1.0, 1.0, 0.0, 0.0])})
  np.testing.assert_allclose(masked, per[:2].mean(), rtol=1e-6)
  weighted = loss_fn(params, {"x": x, "y": y, "weight": jnp.array([2.0, 0.0, 0.0, 0.0])})
  np.testing.assert_allclose(weighted, 2 * per[0] / 4, rtol=1e-6)


def test_bad_names():
  with pytest.raises(ValueError, match="model"):
    models.make_model("resnet", 10)
  with pytest.raises(ValueError, match="num_classes"):
    models.make_model("lr", 1)


def test_resnet18_has_groupnorm_and_no_batch_statistics():
  model = models.ResNet18(num_classes=10)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert set(variables) == {"params"}  # GroupNorm: no batch_stats collection
  n = sum(np.prod(v.shape) for v in jax.tree.leaves(variables["params"]))
  assert 11_000_000 < n < 11_300_000  # ResNet-18's 11.2M parameters


def test_classifier_loss_is_a_per_example_loss_with_masked_mean():
  model = models.LR(num_classes=3)
  loss_fn = models.ClassifierLoss(model)
  params = models.init_params(model, jax.random.key(0), (4,))
  batch = {
    "x": jnp.arange(12.0).reshape(3, 4),
    "y": jnp.array([0, 1, 2]),
    "mask": jnp.array([1.0, 1.0, 0.0]),
  }
  per = loss_fn.per_example(params, batch)
  np.testing.assert_allclose(loss_fn(params, batch), (per[0] + per[1]) / 2, rtol=1e-6)
  assert hash(loss_fn) == hash(models.ClassifierLoss(model))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 2)])
def test_max_pool_matches_flax_with_ties(shape):
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.integers(0, 3, shape).astype(np.float32))  # many ties
  g = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])), jnp.float32)
  want, pull_want = jax.vjp(lambda a: nn.max_pool(a, (2, 2), strides=(2, 2)), a)
  got, pull_got = jax.vjp(models.max_pool_2x2, a)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(pull_got(g)[0], pull_want(g)[0])
