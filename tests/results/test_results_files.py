"""Tests jaxshape/results/files.py: atomic files, exact CSV round trip, JSON, canonical cells."""

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


def test_every_public_name_is_importable_from_results():
  from jaxshape.results import files
  from jaxshape.results import plots
  from jaxshape.results import stats

  for name in results.__all__:
    owner = [m for m in (files, stats, plots) if hasattr(m, name)]
    assert owner and getattr(results, name) is getattr(owner[0], name)


def test_results_without_figures_do_not_import_matplotlib():
  import subprocess
  import sys

  code = "import sys, jaxshape.results; assert 'matplotlib' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)
