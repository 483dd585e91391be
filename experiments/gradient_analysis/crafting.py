"""Each scenario's data and poisons: collision watermarks, patch insertion, label flips, Steinhardt.

References:
  Hong et al. 2020, §3.1-§3.3 (Fig. 1), §6.2 (Fig. 4c/4f).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from experiments import common
from experiments.gradient_analysis.config import SCENARIO_SPECS
from experiments.gradient_analysis.config import SCENARIOS
from experiments.gradient_analysis.config import Config
from experiments.gradient_analysis.config import settings
from jaxshape import poisons

# Salt folded into a seed's key, so crafting draws bits independent of the training run
# (whose key is `jax.random.key(seed)`).
_CRAFT_SALT = 1
# Classes of the collision (base: dress, labelled dress; target: coat) and of the backdoor.
_COLLISION_CLASSES = {"fashion_mnist_3_4": (0, 1), "fashion_mnist": (3, 4)}
_INSERTION_TARGET = 4  # coat


def load(config: Config, name: str) -> dict[str, Any]:
  """The dataset `name`'s (subsampled) training and test sets and its class count."""
  ds = common.load_data(config, name)
  x, y = common.subsample(ds.x_train, ds.y_train, config.max_train, 0)
  x_test, y_test = common.subsample(ds.x_test, ds.y_test, config.max_test, 1)
  return {"x": x, "y": y, "x_test": x_test, "y_test": y_test, "num_classes": ds.num_classes}


def _pad(a: np.ndarray, size: int) -> np.ndarray:
  if a.shape[0] >= size:
    return a[:size]
  return np.concatenate([a, np.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)])


def _craft_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), _CRAFT_SALT)


def craft(config: Config, scenario: str, d: dict[str, Any]):
  """Poison variants `[V, P, ...]`, their labels `[V, P]`, and (setting, seed) -> (variant, count).

  Collision: 100 random (dress, coat) pairs per seed, overlaid at each alpha.
  Insertion: 1% random training points per seed, patched at each size (the
  same points for every size). Label flipping: the largest ratio's poisons
  per seed, a prefix of them for smaller ratios. Steinhardt: deterministic,
  crafted once per ratio.
  """
  x, y, num_classes = d["x"], d["y"], d["num_classes"]
  n = x.shape[0]
  xs, ys, index = [], [], {}

  def add(ps, setting, seeds):
    xs.append(np.asarray(ps.x, np.float32))
    ys.append(np.asarray(ps.y, np.int32))
    for seed in seeds:
      index[setting, seed] = (len(xs) - 1, len(ps))

  if scenario in ("collision_scratch", "collision_retrain"):
    base_class, target_class = _COLLISION_CLASSES[SCENARIO_SPECS[scenario].dataset]
    for seed in range(config.seeds):
      base_P, target_P = poisons.collision_pairs(
        _craft_key(seed),
        y,
        config.num_collision_poisons,
        base_class,
        target_class,
        num_classes=num_classes,
      )
      for alpha in settings(config, scenario):
        add(poisons.watermark(x, y, base_P, target_P, alpha), alpha, [seed])
  elif scenario == "insertion":
    for seed in range(config.seeds):
      for size in settings(config, scenario):
        ps = poisons.patch_backdoor(
          _craft_key(seed),
          x,
          y,
          config.insertion_ratio,
          _INSERTION_TARGET,
          size=size,
          num_classes=num_classes,
        )
        add(ps, size, [seed])
  elif scenario == "label_flip":
    ratios = settings(config, scenario)
    top = max(ratios)
    for seed in range(config.seeds):
      ps = poisons.label_flip(_craft_key(seed), x, y, top, num_classes=num_classes)
      xs.append(np.asarray(ps.x, np.float32))
      ys.append(np.asarray(ps.y, np.int32))
      for r in ratios:
        index[r, seed] = (len(xs) - 1, int(round(r * n)))
  elif scenario == "steinhardt":
    for r in settings(config, scenario):
      if int(round(r * n)) == 0:
        xs.append(np.zeros((1, *x.shape[1:]), np.float32))
        ys.append(np.zeros([1], np.int32))
        index.update({(r, seed): (len(xs) - 1, 0) for seed in range(config.seeds)})
        continue
      ps = poisons.steinhardt(x, y, r, iterations=config.steinhardt_iterations)
      add(ps, r, range(config.seeds))
  else:
    raise ValueError(f"scenario must be among {SCENARIOS}, got {scenario!r}")
  p_max = max(1, max(a.shape[0] for a in xs))
  px_V = np.stack([_pad(a, p_max) for a in xs])
  py_V = np.stack([_pad(a, p_max) for a in ys])
  return px_V, py_V, index
