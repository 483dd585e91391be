"""Tests of experiments/targeted/setups.py: setup parsing and fallback, target choice and
the class-pair margin table (§6.3: targets are test points the model gets right)."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import targeted
from experiments.targeted import setups


def test_parse_setup_accepts_dataset_model_and_names_the_flag_otherwise():
  assert setups.parse_setup("fashion_mnist:mlp") == ("fashion_mnist", "mlp")
  for bad in ("fashion_mnist", "fashion_mnist:resnet", "mnist:lr", "a:b:c"):
    with pytest.raises(ValueError, match="--setups"):
      setups.parse_setup(bad)


def _config(**change):
  return dataclasses.replace(targeted.PRESETS["smoke"], **change)


def _loader(available):
  def load(name):
    if name not in available:
      raise FileNotFoundError(name)
    return f"data of {name}"

  return load


def test_missing_dataset_falls_back_with_a_note_and_deduplicates():
  config = _config(setups=("purchase100:mlp", "fashion_mnist:mlp"), fallback=True)
  found, loaded = setups.resolve_setups(config, loader=_loader({"fashion_mnist"}))
  assert [s.name for s in found] == ["fashion_mnist_mlp"]  # the fallback equals the 2nd setup
  assert found[0].requested == "purchase100:mlp"
  assert "purchase100 is not available here" in found[0].note
  assert loaded == {"fashion_mnist": "data of fashion_mnist"}


def test_missing_dataset_without_fallback_raises():
  config = _config(setups=("purchase100:lr",), fallback=False)
  with pytest.raises(FileNotFoundError):
    setups.resolve_setups(config, loader=_loader({"fashion_mnist"}))


class _Identity(nn.Module):
  """Logits = the input (a 3-class 'model' whose margins are known exactly)."""

  @nn.compact
  def __call__(self, x):
    return x + 0.0 * self.param("unused", nn.initializers.zeros, ())


def _context(x_test, y_test):
  return setups.Context(
    setup=setups.Setup("toy", "lr", "toy:lr"),
    model=_Identity(),
    spec_kwargs={},
    learning_rate=0.1,
    x=x_test,
    y=y_test,
    x_test=x_test,
    y_test=y_test,
    x_eval=x_test,
    y_eval=y_test,
    num_classes=3,
    n_train_full=len(y_test),
  )


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 3)).astype(np.float32) * 3
  y = rng.integers(0, 3, size=60).astype(np.int32)
  return _context(x, y), {"unused": jnp.zeros(())}


def test_margin_table_matches_numpy_and_is_sorted(toy):
  ctx, params = toy
  rows = setups.margin_table(ctx, params)
  assert len(rows) == 6  # ordered pairs of 3 classes
  medians = [r["median_margin"] for r in rows]
  assert medians == sorted(medians)
  for r in rows:
    t, b = r["target_class"], r["base_class"]
    ok = (ctx.y_test == t) & (ctx.x_test.argmax(-1) == t)
    m = ctx.x_test[ok, t] - ctx.x_test[ok, b]
    assert r["n_correct"] == ok.sum()
    np.testing.assert_allclose(r["median_margin"], np.median(m), rtol=1e-6)
    np.testing.assert_allclose(r["frac_under_2"], np.mean(m < 2))
    assert np.all(m > 0)  # correctly classified: the true logit is the largest


def test_choose_targets_keeps_only_correctly_classified_points_of_the_class(toy):
  ctx, params = toy
  chosen = setups.choose_targets(ctx, params, target_class=1, count=5)
  assert 0 < len(chosen) <= 5
  assert np.all(ctx.y_test[chosen] == 1)
  assert np.all(ctx.x_test[chosen].argmax(-1) == 1)
  assert len(set(chosen.tolist())) == len(chosen)
  again = setups.choose_targets(ctx, params, target_class=1, count=5)
  np.testing.assert_array_equal(chosen, again)  # a fixed order, not a fresh draw
