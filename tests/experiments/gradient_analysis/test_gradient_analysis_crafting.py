"""Tests experiments/gradient_analysis/crafting.py: each scenario's poison variants."""

import dataclasses

import numpy as np
import pytest

from experiments import gradient_analysis as ga
from jaxshape import data


def _fmnist_available():
  try:
    data.load("fashion_mnist_3_4")
  except FileNotFoundError:
    return False
  return True


needs_fmnist = pytest.mark.skipif(
  not _fmnist_available(), reason="FashionMNIST not installed (run `make data`)"
)


@needs_fmnist
def test_label_flip_poisons_are_padded_prefixes():
  config = dataclasses.replace(ga.PRESETS["smoke"], poison_ratios=(0.0, 0.2, 0.4), seeds=2)
  d = ga.load(config, "fashion_mnist_3_4")
  px_V, py_V, index = ga.craft(config, "label_flip", d)
  n = d["x"].shape[0]
  assert px_V.shape == (2, round(0.4 * n), *d["x"].shape[1:]) and py_V.shape == px_V.shape[:2]
  for ratio in config.poison_ratios:
    for seed in range(2):
      variant, count = index[ratio, seed]
      assert variant == seed and count == round(ratio * n)
  assert not np.array_equal(px_V[0], px_V[1])  # a draw per seed
