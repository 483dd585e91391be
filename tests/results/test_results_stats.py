"""Tests jaxshape/results/stats.py: mean_std, Wilson intervals, text tables."""

import numpy as np
import pytest

from jaxshape import results


def test_mean_std_against_numpy():
  rows = [
    {"defense": "dp", "clip": 1.0, "acc": 0.8},
    {"defense": "dp", "clip": 1.0, "acc": "0.9"},
    {"defense": "dp", "clip": 1.0, "acc": 0.7},
    {"defense": "dp", "clip": "0.5", "acc": 0.6},
    {"defense": "none", "clip": "", "acc": 0.95},
    {"defense": "none", "clip": "", "acc": None},  # missing: skipped
    {"defense": "dp", "clip": 1, "acc": 0.75},  # 1 and 1.0 are the same group
  ]
  got = results.mean_std(rows, ["defense", "clip"], "acc")
  assert [(g["defense"], g["clip"], g["n"]) for g in got] == [
    ("dp", 1.0, 4),
    ("dp", "0.5", 1),
    ("none", "", 1),
  ]
  values = np.array([0.8, 0.9, 0.7, 0.75])
  assert got[0]["mean"] == pytest.approx(values.mean())
  assert got[0]["std"] == pytest.approx(values.std(ddof=1))
  assert got[1]["mean"] == pytest.approx(0.6) and got[1]["std"] == 0.0


@pytest.mark.parametrize(
  "successes, n, low, high",
  [
    (0, 10, 0.0, 0.277540),  # upper = z^2 / (n + z^2)
    (5, 10, 0.236590, 0.763410),
    (10, 10, 0.722460, 1.0),
    (81, 263, 0.255288, 0.366211),
    (0, 0, 0.0, 1.0),
  ],
)
def test_wilson_interval_known_values(successes, n, low, high):
  got = results.wilson_interval(successes, n)
  assert got == pytest.approx((low, high), abs=2e-6)


@pytest.mark.parametrize("successes, n", [(1, 7), (30, 40), (81, 263)])
def test_wilson_bounds_solve_the_score_equation(successes, n):
  """The bounds are the roots of (p - successes/n)^2 = z^2 p (1 - p) / n."""
  z, rate = 1.96, successes / n
  for p in results.wilson_interval(successes, n, z=z):
    assert (p - rate) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9)


def test_wilson_interval_rejects_bad_counts():
  with pytest.raises(ValueError, match="successes"):
    results.wilson_interval(11, 10)


def test_format_table_aligns():
  rows = [
    {"defense": "dp", "acc": 0.812345, "n": 5},
    {"defense": "adaptive", "acc": "0.9", "n": 10},
  ]
  lines = results.format_table(rows, ["defense", "acc", "n"]).splitlines()
  assert lines[0] == "defense      acc   n"
  assert lines[1] == "--------  ------  --"
  assert lines[2] == "dp        0.8123   5"
  assert lines[3] == "adaptive     0.9  10"
