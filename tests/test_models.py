"""Tests jaxshape/models.py: shapes of the paper's models and the loss."""

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
  ],
)
def test_shapes(name, shape, kwargs, n_features):
  model = models.make_model(name, 10, **kwargs)
  params = models.init_params(model, jax.random.key(0), shape)
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
