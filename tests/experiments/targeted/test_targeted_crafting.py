"""Tests of experiments/targeted/crafting.py: the ceiling and watermark poisons are what they
claim, and crafted poisons are cached by what produced them."""

import dataclasses
import types

import jax
import numpy as np
import pytest

from experiments import common
from experiments.targeted import config as config_lib
from experiments.targeted import crafting
from experiments.targeted import setups
from jaxshape import models


@pytest.fixture(scope="module")
def world():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(90, 6)).astype(np.float32)
  y = (np.arange(90) % 3).astype(np.int32)
  ds = types.SimpleNamespace(x_train=x, y_train=y, x_test=x, y_test=y, num_classes=3)
  config = dataclasses.replace(
    config_lib.SMOKE,
    target_class=0,
    base_class=1,
    max_train=None,
    max_test=None,
    hidden=(5,),
    candidates=4,
    craft_iters=1,
    craft_lr=1e-9,
    watermark=0.3,
    max_feature_distance=1e9,
  )
  ctx = setups.make_context(config, setups.Setup("synthetic", "mlp", "synthetic:mlp"), ds)
  params = jax.tree.map(np.asarray, models.init_params(ctx.model, jax.random.key(1), (6,)))
  return ctx, config, params, np.asarray([0, 3], np.int32)


def test_ceiling_is_the_target_itself(world):
  ctx, config, _, targets = world
  one = crafting.ceiling(ctx, targets, 3, "oneshot")
  for i, t in enumerate(targets):
    np.testing.assert_array_equal(one.x_TQ[i, 0], ctx.x_test[t])
  assert one.count_T.tolist() == [1, 1]  # one distinct poison: one attempt
  multi = crafting.ceiling(ctx, targets, 3, "multipoison")
  assert multi.count_T.tolist() == [3, 3]
  np.testing.assert_array_equal(multi.x_TQ[1, 2], ctx.x_test[targets[1]])


def test_watermark_poisons_start_from_target_blended_bases(world):
  ctx, config, params, targets = world
  crafted = crafting.frogs(ctx, config, params, targets, 2, opacity=config.watermark)
  bases = ctx.x_test[ctx.y_test == config.base_class]
  plain = crafting.frogs(ctx, config, params, targets, 2, opacity=0.0)
  for i, t in enumerate(targets):
    blended = 0.7 * bases + 0.3 * ctx.x_test[t]
    for q in range(2):
      # Each poison is (to the tiny step size) one base blended with its own target ...
      err = np.abs(blended - crafted.x_TQ[i, q]).max(axis=1).min()
      assert err < 1e-4
      # ... and the plain attack's poisons are unblended bases.
      assert np.abs(bases - plain.x_TQ[i, q]).max(axis=1).min() < 1e-4
  assert (crafted.base_TQ == -1).all() and crafted.count_T.tolist() == [2, 2]
  assert np.all(np.diff(crafted.score_TQ, axis=1) >= 0)  # nearest first


def test_craft_caches_by_settings(world, tmp_path):
  ctx, config, params, targets = world
  cache = common.ParamsCache(str(tmp_path))
  a = crafting.craft(ctx, config, "watermark", params, targets, 2, 0, cache, "p")
  b = crafting.craft(ctx, config, "watermark", params, targets, 2, 0, cache, "p")
  np.testing.assert_array_equal(a.x_TQ, b.x_TQ)
  assert len(list(tmp_path.iterdir())) == 1
  crafting.craft(ctx, config, "poison_frogs", params, targets, 2, 0, cache, "p")
  assert len(list(tmp_path.iterdir())) == 2
  with pytest.raises(ValueError, match="attack must be"):
    crafting.craft(ctx, config, "nope", params, targets, 2, 0, cache, "p")
