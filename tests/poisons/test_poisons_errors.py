"""Tests jaxshape/poisons: bad parameters and NaN inputs raise ValueError naming the argument."""

import jax
import numpy as np
import pytest

from jaxshape import models
from jaxshape import poisons

KEY = jax.random.key(0)
X = np.random.default_rng(0).uniform(size=(12, 8, 8, 1)).astype(np.float32)
Y3 = np.arange(12, dtype=np.int32) % 3
Y2 = Y3 % 2
X_NAN = X.copy()
X_NAN[3, 2, 1, 0] = np.nan
X_UINT8 = np.round(X * 255).astype(np.uint8)  # pixels not divided by 255
X_NEGATIVE = X - 0.5  # standardised inputs
MODEL = models.LR(3)
PARAMS = models.init_params(MODEL, KEY, (8, 8, 1))
IDX = np.array([0, 3], np.int32)

CASES = {
  # label flipping
  "flip-ratio-negative": (lambda: poisons.label_flip(KEY, X, Y3, -0.1), "ratio"),
  "flip-ratio-above-one": (lambda: poisons.label_flip(KEY, X, Y3, 1.5), "ratio"),
  "flip-ratio-nan": (lambda: poisons.label_flip(KEY, X, Y3, float("nan")), "ratio"),
  "flip-nan-input": (lambda: poisons.label_flip(KEY, X_NAN, Y3, 0.1), "x"),
  "flip-label-out-of-range": (lambda: poisons.label_flip(KEY, X, Y3, 0.1, num_classes=2), "y"),
  "flip-no-key": (lambda: poisons.label_flip(None, X, Y3, 0.1), "key"),
  # watermark collision
  "watermark-alpha-above-one": (lambda: poisons.watermark(X, Y3, IDX, IDX, 1.5), "alpha"),
  "watermark-alpha-negative": (lambda: poisons.watermark(X, Y3, IDX, IDX, -0.2), "alpha"),
  "watermark-index-out-of-range": (lambda: poisons.watermark(X, Y3, [0, 12], IDX, 0.5), "base_idx"),
  "watermark-nan-input": (lambda: poisons.watermark(X_NAN, Y3, IDX, IDX, 0.5), "x"),
  "pairs-missing-class": (lambda: poisons.collision_pairs(KEY, Y3, 2, 0, 5), "target_class"),
  "pairs-too-many": (lambda: poisons.collision_pairs(KEY, Y3, 5, 0, 1), "num_pairs"),
  # patch backdoor
  "patch-larger-than-image": (lambda: poisons.patch_backdoor(KEY, X, Y3, 0.1, 1, size=9), "size"),
  "patch-size-zero": (lambda: poisons.patch_backdoor(KEY, X, Y3, 0.1, 1, size=0), "size"),
  "patch-corner": (
    lambda: poisons.patch_backdoor(KEY, X, Y3, 0.1, 1, size=2, corner="mid"),
    "corner",
  ),
  "patch-ratio": (lambda: poisons.patch_backdoor(KEY, X, Y3, 1.2, 1, size=2), "ratio"),
  "patch-missing-class": (
    lambda: poisons.patch_backdoor(KEY, X, Y3, 0.1, 3, size=2),
    "target_class",
  ),
  "patch-value": (lambda: poisons.patch_backdoor(KEY, X, Y3, 0.1, 1, size=2, value=2.0), "value"),
  "patch-nan-input": (lambda: poisons.patch_backdoor(KEY, X_NAN, Y3, 0.1, 1, size=2), "x"),
  "patch-not-an-image": (lambda: poisons.patch_trigger((64,), 2), "input_shape"),
  # blend
  "blend-lam-zero": (lambda: poisons.blend(KEY, X, Y3, 0.1, 1, lam=0.0), "lam"),
  "blend-lam-above-one": (lambda: poisons.blend(KEY, X, Y3, 0.1, 1, lam=1.5), "lam"),
  "blend-pattern-shape": (
    lambda: poisons.blend(KEY, X, Y3, 0.1, 1, pattern=np.zeros((4, 4, 1), np.float32)),
    "pattern",
  ),
  "blend-pattern-nan": (lambda: poisons.blend(KEY, X, Y3, 0.1, 1, pattern=X_NAN[3]), "pattern"),
  "blend-missing-class": (lambda: poisons.blend(KEY, X, Y3, 0.1, -1), "target_class"),
  "blend-nan-input": (lambda: poisons.blend(KEY, X_NAN, Y3, 0.1, 1), "x"),
  # Steinhardt
  "steinhardt-ratio": (lambda: poisons.steinhardt(X, Y2, 1.01), "ratio"),
  "steinhardt-quantile": (lambda: poisons.steinhardt(X, Y2, 0.3, quantile=0.0), "quantile"),
  "steinhardt-multiclass": (lambda: poisons.steinhardt(X, Y3, 0.3), "y"),
  "steinhardt-select": (lambda: poisons.steinhardt(X, Y2, 0.3, select="best"), "select"),
  "steinhardt-learning-rate": (
    lambda: poisons.steinhardt(X, Y2, 0.3, learning_rate=0.0),
    "learning_rate",
  ),
  "steinhardt-checkpoint": (
    lambda: poisons.steinhardt(X, Y2, 0.3, iterations=5, checkpoints=[9]),
    "checkpoints",
  ),
  "steinhardt-nan-input": (lambda: poisons.steinhardt(X_NAN, Y2, 0.3), "x"),
  "feasibility-labels": (lambda: poisons.feasibility(X, Y2, X[:2], [0, 2]), "y_poison"),
  # Poison Frogs
  "frogs-learning-rate": (
    lambda: poisons.poison_frogs(MODEL, PARAMS, X[0], X, Y3, IDX, learning_rate=0.0),
    "learning_rate",
  ),
  "frogs-watermark": (
    lambda: poisons.poison_frogs(MODEL, PARAMS, X[0], X, Y3, IDX, watermark=1.0),
    "watermark",
  ),
  "frogs-bound": (
    lambda: poisons.poison_frogs(MODEL, PARAMS, X[0], X, Y3, IDX, max_feature_distance=0.0),
    "max_feature_distance",
  ),
  "frogs-base-index": (lambda: poisons.poison_frogs(MODEL, PARAMS, X[0], X, Y3, [40]), "base_idx"),
  "frogs-loop": (lambda: poisons.poison_frogs(MODEL, PARAMS, X[0], X, Y3, IDX, loop="gpu"), "loop"),
  "frogs-nan-pool": (lambda: poisons.poison_frogs(MODEL, PARAMS, X[0], X_NAN, Y3, IDX), "x_pool"),
  "frogs-nan-target": (
    lambda: poisons.poison_frogs(MODEL, PARAMS, X_NAN[3], X, Y3, IDX),
    "x_target",
  ),
  "nearest-missing-class": (
    lambda: poisons.nearest_candidates(MODEL, PARAMS, X[0], X, Y3, 7),
    "base_class",
  ),
  "nearest-too-many": (
    lambda: poisons.nearest_candidates(MODEL, PARAMS, X[0], X, Y3, 0, 5),
    "num_candidates",
  ),
  # Witches' Brew
  "brew-epsilon-zero": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X[0], 2, X, Y3, budget=2, epsilon=0.0),
    "epsilon",
  ),
  "brew-epsilon-negative": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X[0], 2, X, Y3, budget=2, epsilon=-0.1),
    "epsilon",
  ),
  "brew-missing-class": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X[0], 3, X, Y3, budget=2),
    "adversarial_class",
  ),
  "brew-budget": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X[0], 2, X, Y3, budget=5),
    "budget",
  ),
  "brew-bases-of-another-class": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X[0], 2, X, Y3, base_idx=[0, 2]),
    "base_idx",
  ),
  "brew-restarts": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X[0], 2, X, Y3, budget=2, restarts=0),
    "restarts",
  ),
  "brew-loop": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X[0], 2, X, Y3, budget=2, loop="gpu"),
    "loop",
  ),
  "brew-nan-input": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X[0], 2, X_NAN, Y3, budget=2),
    "x",
  ),
  "brew-nan-target": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X_NAN[3], 2, X, Y3, budget=2),
    "x_target",
  ),
  # Pixels outside [0, 1], strings for numbers, empty data, indices out of range.
  "flip-uint8-pixels": (
    lambda: poisons.label_flip(KEY, X_UINT8, Y3, 0.1),
    "x holds values in [0, 25",
  ),
  "flip-negative-inputs": (lambda: poisons.label_flip(KEY, X_NEGATIVE, Y3, 0.1), "x holds values"),
  "flip-no-examples": (lambda: poisons.label_flip(KEY, X[:0], Y3[:0], 0.1), "x holds no examples"),
  "flip-ratio-string": (lambda: poisons.label_flip(KEY, X, Y3, "0.1"), "ratio must be a number"),
  "flip-string-inputs": (
    lambda: poisons.label_flip(KEY, np.full((12, 2), "a"), Y3, 0.1),
    "x must be an array of numbers",
  ),
  "watermark-uint8-pixels": (lambda: poisons.watermark(X_UINT8, Y3, IDX, IDX, 0.5), "x holds"),
  "patch-uint8-pixels": (
    lambda: poisons.patch_backdoor(KEY, X_UINT8, Y3, 0.1, 1, size=2),
    "x holds values",
  ),
  "blend-uint8-pixels": (lambda: poisons.blend(KEY, X_UINT8, Y3, 0.1, 1), "x holds values"),
  "blend-pattern-uint8": (
    lambda: poisons.blend(KEY, X, Y3, 0.1, 1, pattern=X_UINT8[0]),
    "pattern holds values",
  ),
  "blend-lam-string": (lambda: poisons.blend(KEY, X, Y3, 0.1, 1, lam="a"), "lam must be a number"),
  "steinhardt-uint8-pixels": (lambda: poisons.steinhardt(X_UINT8, Y2, 0.3), "x holds values"),
  "trigger-uint8-pixels": (
    lambda: poisons.apply_trigger(X_UINT8, poisons.patch_trigger((8, 8, 1), 2)),
    "x holds values",
  ),
  "merge-uint8-pixels": (
    lambda: poisons.merge((X_UINT8, Y3), poisons.label_flip(KEY, X, Y3, 0.1)),
    "data x holds values",
  ),
  "take-index-out-of-range": (
    lambda: poisons.label_flip(KEY, X, Y3, 0.5).take([100]),
    "indices has indices outside",
  ),
  "frogs-uint8-pool": (
    lambda: poisons.poison_frogs(MODEL, PARAMS, X[0], X_UINT8, Y3, IDX),
    "x_pool holds values",
  ),
  "brew-uint8-target": (
    lambda: poisons.witches_brew(KEY, MODEL, PARAMS, X_UINT8[3], 2, X, Y3, budget=2),
    "x_target holds values",
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_parameter_raises_value_error_naming_it(name):
  call, argument = CASES[name]
  with pytest.raises(ValueError) as error:
    call()
  assert str(error.value).startswith(argument), str(error.value)
