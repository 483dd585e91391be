"""Tests jaxshape/poisons/narcissus.py.

The trigger respects its l-inf budget exactly and lowers Eq. 2's objective on
a trained surrogate (RAdam and signed steps); the poi-warm-up lowers the
surrogate's target-class loss; poisons are target-class training points (labels
unchanged) within the budget; the surrogate set refuses POOD data holding the
target class; bad inputs raise ValueError before any work.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models
from jaxshape import poisons
from jaxshape import train
from jaxshape.poisons.narcissus import trigger_loss

EPS = 16 / 255


def _images(key, n, num_classes=3):
  y = (jnp.arange(n) % num_classes).astype(jnp.int32)
  templates = jax.random.uniform(jax.random.key(7), (num_classes, 8, 8, 1), maxval=0.7)
  x = jnp.clip(templates[y] + 0.2 * jax.random.normal(key, (n, 8, 8, 1)), 0.0, 1.0)
  return x, y


@pytest.fixture(scope="module")
def setup():
  x, y = _images(jax.random.key(0), 300)
  x_pub, y_pub = _images(jax.random.key(1), 300)
  keep = np.asarray(y_pub) != 2
  x_target = x[np.asarray(y) == 2][:40]
  data = poisons.surrogate_set(x_pub[keep], y_pub[keep], x_target, 2)
  model = models.MLP(num_classes=3, hidden=(16,))
  spec = train.TrainSpec(models.ClassifierLoss(model), "sgd", batch_size=50, epochs=5)
  params = train.fit(spec, train.HParams.create(0.1), jax.random.key(2), data).params
  fit = poisons.optimise_trigger(jax.random.key(3), model, params, x_target, 2, steps=60)
  return x, y, x_target, model, params, fit


@pytest.mark.parametrize("optimizer", ["radam", "sign"])
def test_both_optimisers_lower_the_objective_within_budget(setup, optimizer):
  _, _, x_target, model, params, _ = setup
  fit = poisons.optimise_trigger(
    jax.random.key(5), model, params, x_target, 2, steps=60, optimizer=optimizer
  )
  assert float(jnp.max(jnp.abs(fit.delta))) <= EPS + 1e-7
  before = float(trigger_loss(model, params, x_target, jnp.zeros_like(fit.delta), 2))
  assert float(trigger_loss(model, params, x_target, fit.delta, 2)) < 0.9 * before


def test_warm_up_pulls_the_surrogate_to_the_target_class(setup):
  x, y, x_target, model, params, _ = setup
  warmed, loss_S = poisons.warm_up_surrogate(
    jax.random.key(6), model, params, x_target, 2, steps=10, learning_rate=0.01
  )
  assert loss_S.shape == (10,)
  assert jax.tree.structure(warmed) == jax.tree.structure(params)
  zero = jnp.zeros(x_target.shape[1:])
  before = float(trigger_loss(model, params, x_target, zero, 2))
  assert float(trigger_loss(model, warmed, x_target, zero, 2)) < before
  with pytest.raises(ValueError, match="learning_rate"):
    poisons.warm_up_surrogate(jax.random.key(0), model, params, x_target, 2, learning_rate=0.0)


def test_surrogate_set_labels_and_refuses_target_class(setup):
  x, y, x_target, *_ = setup
  data = poisons.surrogate_set(x[:5], jnp.array([0, 1, 0, 1, 0]), x_target[:3], 2)
  np.testing.assert_array_equal(data["y"], [0, 1, 0, 1, 0, 2, 2, 2])
  assert data["x"].shape == (8, 8, 8, 1)
  with pytest.raises(ValueError, match="must not contain the target class"):
    poisons.surrogate_set(x[:5], y[:5], x_target[:3], 2)


def test_trigger_budget_and_objective_decreases(setup):
  _, _, x_target, model, params, fit = setup
  assert fit.delta.shape == (8, 8, 1)
  assert float(jnp.max(jnp.abs(fit.delta))) <= EPS + 1e-7
  assert fit.loss_S.shape == (60,)
  before = float(trigger_loss(model, params, x_target, jnp.zeros_like(fit.delta), 2))
  after = float(trigger_loss(model, params, x_target, fit.delta, 2))
  assert after < 0.9 * before, (before, after)
  assert float(fit.loss_S[-10:].mean()) < float(fit.loss_S[:10].mean())


def test_poisons_are_clean_label_within_budget(setup):
  x, y, _, _, _, fit = setup
  ps = poisons.narcissus(jax.random.key(4), x, y, 0.1, 2, fit.delta)
  assert len(ps) == 30 and ps.attack == "narcissus" and ps.base_split == "train"
  base = np.asarray(ps.base_idx)
  assert np.unique(base).size == 30
  np.testing.assert_array_equal(np.asarray(y)[base], 2)
  np.testing.assert_array_equal(ps.y, 2)
  diff = np.abs(np.asarray(ps.x) - np.asarray(x)[base])
  assert diff.max() <= EPS + 1e-6 and diff.max() > 0
  assert float(ps.x.min()) >= 0.0 and float(ps.x.max()) <= 1.0
  merged = poisons.merge((x, y), ps, replace=True)
  np.testing.assert_array_equal(merged["y"], y)
  assert float(merged["is_poison"].sum()) == 30
  x3 = poisons.apply_narcissus(x[:4], fit.delta, 3.0)
  np.testing.assert_allclose(x3, jnp.clip(x[:4] + 3 * fit.delta[None], 0, 1))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"ratio": 0.5}, "has only"),
    ({"target_class": 5}, "target_class"),
    ({"epsilon": 1 / 255}, "l-inf budget"),
    ({"delta": jnp.zeros((4, 4, 1))}, "input shape"),
  ],
)
def test_narcissus_bad_inputs(setup, kwargs, match):
  x, y, _, _, _, fit = setup
  args = {"ratio": 0.1, "target_class": 2, "delta": fit.delta, **kwargs}
  eps = args.pop("epsilon", EPS)
  with pytest.raises(ValueError, match=match):
    poisons.narcissus(jax.random.key(0), x, y, epsilon=eps, **args)


def test_optimise_trigger_bad_inputs(setup):
  _, _, x_target, model, params, _ = setup
  with pytest.raises(ValueError, match="key is required"):
    poisons.optimise_trigger(None, model, params, x_target, 2)
  with pytest.raises(ValueError, match="batch_size"):
    poisons.optimise_trigger(jax.random.key(0), model, params, x_target, 2, batch_size=41)
  with pytest.raises(ValueError, match="epsilon"):
    poisons.optimise_trigger(jax.random.key(0), model, params, x_target, 2, epsilon=0.0)
  with pytest.raises(ValueError, match="optimizer"):
    poisons.optimise_trigger(jax.random.key(0), model, params, x_target, 2, optimizer="adam")
