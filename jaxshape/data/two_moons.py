"""The two-moons toy data set: two interleaved half circles in the plane.

Shapes: N points, 2 coordinates.

References:
  Hong et al. (2020), Appendix D (decision boundaries of a vanilla and a DP
  MLP on two moons, 700 training and 300 test points).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
  "NUM_TEST",
  "NUM_TRAIN",
  "make_two_moons",
  "split_two_moons",
]

NUM_TRAIN = 700
NUM_TEST = 300


def make_two_moons(n: int, *, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Draws `n` points of two interleaved half circles, shuffled.

  Class 0 lies on the upper half circle of radius 1 centred at (0, 0); class
  1 on the lower half circle centred at (1, 0.5). Each class gets evenly
  spaced angles over [0, pi] (class 0 gets the extra point when `n` is odd),
  then every coordinate gets independent Gaussian noise of standard
  deviation `noise`.

  Args:
    n: number of points, at least 2.
    noise: standard deviation of the noise, >= 0.
    seed: seeds the noise and the shuffle; the same seed gives the same points.

  Returns:
    (x_N2, y_N): float32 points and int32 labels in {0, 1}.

  Example:
    >>> x_N2, y_N = make_two_moons(1000, noise=0.1, seed=0)
    >>> x_N2.shape, y_N.shape
    ((1000, 2), (1000,))
  """
  if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
    raise ValueError(f"n must be an integer >= 2, got {n!r}")
  if not math.isfinite(noise) or noise < 0:
    raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
  num_upper = (n + 1) // 2
  num_lower = n - num_upper
  angle_upper = np.linspace(0.0, np.pi, num_upper)
  angle_lower = np.linspace(0.0, np.pi, num_lower)
  upper_N2 = np.stack([np.cos(angle_upper), np.sin(angle_upper)], axis=1)
  lower_N2 = np.stack([1.0 - np.cos(angle_lower), 0.5 - np.sin(angle_lower)], axis=1)
  x_N2 = np.concatenate([upper_N2, lower_N2])
  y_N = np.concatenate([np.zeros(num_upper, np.int32), np.ones(num_lower, np.int32)])
  rng = np.random.default_rng(seed)
  x_N2 = x_N2 + rng.normal(scale=noise, size=x_N2.shape)
  order = rng.permutation(n)
  return x_N2[order].astype(np.float32), y_N[order]


def split_two_moons(*, seed: int = 0, noise: float = 0.1) -> tuple[np.ndarray, ...]:
  """Draws 1,000 points and splits them into 700 training and 300 test points.

  Returns:
    (x_train_N2, y_train_N, x_test_N2, y_test_N).
  """
  x_N2, y_N = make_two_moons(NUM_TRAIN + NUM_TEST, noise=noise, seed=seed)
  return x_N2[:NUM_TRAIN], y_N[:NUM_TRAIN], x_N2[NUM_TRAIN:], y_N[NUM_TRAIN:]
