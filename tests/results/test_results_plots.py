"""Tests jaxshape/results/plots.py: PNG line and panel plots, distinct series styles."""

import os

import numpy as np
import pytest

from jaxshape import results


def test_line_plot_writes_png(tmp_path):
  path = tmp_path / "figs" / "acc.png"
  results.line_plot(
    path,
    {
      "dp": ([0.1, 1.0, 10.0], [0.9, 0.8, 0.5], [0.01, 0.02, 0.05]),
      "vanilla": (np.array([0.1, 10.0]), np.array([0.95, 0.95]), None),
    },
    "noise multiplier",
    "test accuracy",
    "DP-SGD vs vanilla",
    logx=True,
    ylim=(0, 1),
  )
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="y_std"):
    results.line_plot(path, {"s": ([1, 2], [3, 4], [1])}, "x", "y", "t")


def test_panel_plot_writes_png(tmp_path):
  path = tmp_path / "panels.png"
  results.panel_plot(
    path,
    [("a", {"s": ([1, 2], [0.1, 0.2], [0.01, 0.02])}), ("b", {"t": ([1, 2], [0.3, 0.1], None)})],
    "x",
    "y",
  )
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not [p for p in os.listdir(tmp_path) if p != "panels.png"]


@pytest.mark.parametrize("n", [1, 3, 10, 14, 20])
def test_series_styles_are_distinct(n):
  looks = {
    (str(s["color"]), s["marker"], s["linestyle"]) for s in (results.style(i, n) for i in range(n))
  }
  assert len(looks) == n
