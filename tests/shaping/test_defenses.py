"""Tests the conventions every jaxshape/shaping transform keeps (vmap over its hyperparameter,
NaN examples dropped and counted, ValueError on invalid arguments) and
jaxshape/shaping/defenses.py: the shaping defenses of `train`."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models
from jaxshape import shaping
from jaxshape import train
from tests.shaping.helpers import PARAMS
from tests.shaping.helpers import B
from tests.shaping.helpers import flat
from tests.shaping.helpers import per_example
from tests.shaping.helpers import ref_trimmed
from tests.shaping.helpers import unflat

FACTORIES = {
  "centered": lambda h: shaping.centered_clip(h),
  "cosine": lambda h: shaping.cosine_gate((h - 2.5) / 2.0, 2.0),
  "trimmed": lambda h: shaping.trimmed_mean(h / 10.0),
  "quantile": lambda h: shaping.quantile_clip(0.5, h),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_vmap_over_hyperparameter_equals_each(name):
  g1, g2 = per_example(0, shift=0.5), per_example(1, shift=0.5)
  hs = [1.0, 2.5, 4.0]

  def two(h):
    tx = FACTORIES[name](h)
    _, s = tx.update(g1, tx.init(PARAMS), PARAMS)
    return tx.update(g2, s, PARAMS)[0].sum

  got = jax.jit(jax.vmap(two))(jnp.asarray(hs))
  for i, h in enumerate(hs):
    row = jax.tree.map(lambda a, i=i: a[i], got)
    chex.assert_trees_all_close(row, two(h), rtol=1e-5, atol=1e-5)


ALL = {
  "centered": lambda: shaping.centered_clip(2.0),
  "cosine": lambda: shaping.cosine_gate(0.0, 2.0),
  "trimmed": lambda: shaping.trimmed_mean(0.2),
  "median": shaping.coordinate_median,
  "quantile": lambda: shaping.quantile_clip(0.5, 2.0),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_nan_example_is_dropped_and_counted(name):
  g = per_example(4)
  bad = jax.tree.map(lambda x: x.at[3].set(jnp.nan), g)
  tx = ALL[name]()
  out, state = jax.jit(tx.update)(bad, tx.init(PARAMS), PARAMS)
  assert int(state.num_nonfinite) == 1
  assert float(out.mask_B[3]) == 0.0 and float(jnp.sum(out.mask_B)) == B - 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out.sum))
  # The same as the batch without example 3 (the robust means scaled to B examples).
  keep = np.arange(B) != 3
  rows = flat(g)[keep]
  if name in ("trimmed", "median"):
    want = B * (ref_trimmed(rows, 0.2) if name == "trimmed" else np.median(rows, 0))
    chex.assert_trees_all_close(out.sum, unflat(want), rtol=1e-5, atol=1e-5)
  else:
    zeroed = jax.tree.map(lambda x: jnp.where(keep.reshape((B,) + (1,) * (x.ndim - 1)), x, 0.0), g)
    masked = shaping.MaskedGrads(zeroed, jnp.asarray(keep, jnp.float32))
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
  tx = shaping.centered_clip(1.0)
  with pytest.raises(ValueError, match="batch axis"):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS)


# --- train ------------------------------------------------------------------------------------

LOSS = models.ClassifierLoss(models.MLP(3, hidden=(5,)))


def _fit(defense, hp, data):
  spec = train.TrainSpec(LOSS, optimizer="sgd", defense=defense, batch_size=10, epochs=2)
  return jax.jit(train.fit, static_argnums=0)(spec, hp, jax.random.key(1), data)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(24, 6)), jnp.float32)
  return {"x": x, "y": jnp.asarray(rng.integers(0, 3, 24), jnp.int32)}


@pytest.fixture(scope="module")
def vanilla(data):
  return _fit("vanilla", train.HParams.create(0.3), data)


@pytest.mark.parametrize("defense,param", [("centered", 0.5), ("trimmed", 0.0), ("cosine", -1.0)])
def test_train_defense_reduces_to_plain_sgd(data, vanilla, defense, param):
  """tau = inf, trim 0 and kappa = -1 with C = inf shape nothing: the run equals vanilla's."""
  shaped = _fit(defense, train.HParams.create(0.3, math.inf, 0.0, param), data)
  chex.assert_trees_all_close(shaped.params, vanilla.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("defense", ["centered", "median", "quantile"])
def test_train_defense_shapes_and_records(data, vanilla, defense):
  result = _fit(defense, train.HParams.create(0.3, 0.1, 0.0, 0.5), data)
  assert np.all(np.isfinite(result.records["train_loss"]))
  assert np.all(np.isfinite(result.records["norm_mean"]))
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), result.params, vanilla.params)
  assert max(jax.tree.leaves(diff)) > 1e-4  # the mechanism changed the run
