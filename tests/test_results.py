"""Tests jaxshape/results.py: atomic files, CSV round trip, statistics, tables and plots."""

import json
import math
import os

import numpy as np
import pytest

from jaxshape import results


def test_atomic_writes_leave_no_temp_files(tmp_path):
  results.write_csv(tmp_path / "r.csv", [{"a": 1, "b": 0.5}], ["a", "b"])
  results.write_csv(tmp_path / "r.csv", [{"a": 2, "b": 1.5}], ["a", "b"])  # overwrite
  results.write_json(tmp_path / "config.json", {"x": 1})
  results.line_plot(tmp_path / "p.png", {"s": ([1, 2], [3, 4], None)}, "x", "y", "t")
  assert sorted(os.listdir(tmp_path)) == ["config.json", "p.png", "r.csv"]
  assert results.read_csv(tmp_path / "r.csv") == [{"a": "2", "b": "1.5"}]


def test_failed_write_keeps_old_file(tmp_path):
  path = tmp_path / "r.csv"
  results.write_csv(path, [{"a": 1}], ["a"])
  before = path.read_bytes()
  with pytest.raises(RuntimeError), results.atomic_open(path) as f:
    f.write("partial")
    raise RuntimeError("killed mid-write")
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["r.csv"]
  with pytest.raises(ValueError, match="not among the columns"):
    results.write_csv(path, [{"a": 1, "zzz": 2}], ["a"])
  assert path.read_bytes() == before


def test_atomic_open_creates_directories_with_umask_permissions(tmp_path):
  path = tmp_path / "deep" / "er" / "x.json"
  results.write_json(path, [1])
  assert results.read_json(path) == [1]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_csv_round_trip_is_exact(tmp_path):
  rows = [
    {"name": "dp", "x": 0.1, "y": np.float32(0.1), "n": np.int64(3), "ok": True, "none": None},
    {"name": 'a,b "q"', "x": 1e-30, "y": math.inf, "n": -2, "ok": False, "none": ""},
  ]
  columns = ["name", "x", "y", "n", "ok", "none"]
  results.write_csv(tmp_path / "r.csv", rows, columns)
  assert results.read_header(tmp_path / "r.csv") == columns
  parsed = results.parse(results.read_csv(tmp_path / "r.csv", columns=columns))
  assert parsed[0] == {
    "name": "dp",
    "x": 0.1,
    "y": float(np.float32(0.1)),
    "n": 3,
    "ok": True,
    "none": None,
  }
  assert parsed[1] == {
    "name": 'a,b "q"',
    "x": 1e-30,
    "y": math.inf,
    "n": -2,
    "ok": False,
    "none": None,
  }


def test_read_csv_checks_header_and_shape(tmp_path):
  path = tmp_path / "r.csv"
  assert results.read_csv(path) == []  # missing file: no rows
  assert results.read_header(path) is None
  results.write_csv(path, [{"a": 1, "b": 2}], ["a", "b"])
  with pytest.raises(ValueError, match="expected"):
    results.read_csv(path, columns=["a", "c"])
  path.write_text("a,b\n1,2\n3\n")
  with pytest.raises(ValueError, match="corrupt"):
    results.read_csv(path)


@pytest.mark.parametrize(
  "value, text",
  [
    (1, "1.0"),
    (1.0, "1.0"),
    ("1", "1.0"),
    ("1.0", "1.0"),
    (np.float32(0.5), "0.5"),
    ("dp", "dp"),
    (True, "True"),
    (None, ""),
  ],
)
def test_canonical(value, text):
  assert results.canonical(value) == text


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


def test_write_json_converts_numpy(tmp_path):
  path = tmp_path / "config.json"
  results.write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": (1, 2), "d": math.nan})
  text = path.read_text()
  assert json.loads(text.replace("NaN", "null")) == {
    "a": 0.5,
    "b": [0, 1, 2],
    "c": [1, 2],
    "d": None,
  }


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
