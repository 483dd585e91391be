"""The clean set and the indiscriminate poisons: label flipping and Steinhardt et al.'s attack.

References:
  Hong et al. 2020, §6.2; Steinhardt, Koh & Liang 2017 (the min-max attack).
"""

from __future__ import annotations

import jax
import numpy as np

from experiments import common
from experiments.indiscriminate.config import ATTACKS
from experiments.indiscriminate.config import Config
from jaxshape import poisons


def load(config: Config):
  """The dataset and its clean training set (a fixed random `max_train` subset if set)."""
  ds = common.load_data(config, config.dataset)
  x, y = ds.x_train, ds.y_train
  if config.max_train is not None and config.max_train < x.shape[0]:
    keep = np.random.default_rng(0).permutation(x.shape[0])[: config.max_train]
    x, y = x[keep], y[keep]
  return ds, np.asarray(x, np.float32), np.asarray(y, np.int32)


def craft(config: Config, attack: str, x, y, num_classes: int):
  """Poison variants `[V, P, ...]` with labels and, per (ratio, seed), (variant, count).

  Label flipping draws the largest ratio's poisons once per seed and uses the
  first round(ratio N) of them for smaller ratios (a random subset is again a
  random label flip). Steinhardt's attack depends on the ratio (the poison
  mass drags the defense's centroids) and not on a seed, so it is crafted once
  per ratio.
  """
  n = x.shape[0]
  counts = {r: int(round(r * n)) for r in config.poison_ratios}
  p_max = max(max(counts.values()), 1)
  xs, ys, index = [], [], {}
  if attack == "label_flip":
    for seed in range(config.seeds):
      ps = poisons.label_flip(jax.random.key(seed), x, y, p_max / n, num_classes=num_classes)
      xs.append(_pad(np.asarray(ps.x), p_max))
      ys.append(_pad(np.asarray(ps.y), p_max))
      for r in config.poison_ratios:
        index[r, seed] = (seed, counts[r])
  elif attack == "steinhardt":
    for v, r in enumerate(config.poison_ratios):
      if counts[r] == 0:
        px, py = np.zeros((p_max, *x.shape[1:]), np.float32), np.zeros(p_max, np.int32)
      else:
        ps = poisons.steinhardt(x, y, r, iterations=config.steinhardt_iterations)
        px, py = _pad(np.asarray(ps.x), p_max), _pad(np.asarray(ps.y), p_max)
      xs.append(px)
      ys.append(py)
      for seed in range(config.seeds):
        index[r, seed] = (v, counts[r])
  else:
    raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
  return np.stack(xs), np.stack(ys), index


def _pad(a, size):
  if a.shape[0] >= size:
    return a[:size]
  return np.concatenate([a, np.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)])
