"""Tests jaxshape/report.py: pivot tables of mean ± std over seeds, side columns, file notes."""

import math
import re

import numpy as np
import pytest

from jaxshape import report


def _rows():
  rng = np.random.default_rng(0)
  rows = []
  for defense, eps in (("vanilla", math.inf), ("dp", 1.5)):
    for ratio in (0.4, 0.0, 0.1):  # unsorted on purpose
      for seed in range(3):
        rows.append(
          {
            "defense": defense,
            "ratio": str(ratio),  # numeric strings, as read from a CSV
            "seed": seed,
            "rad": float(rng.uniform()),
            "acc": 0.9 + 0.01 * seed,  # a clean accuracy per seed, repeated per ratio
            "eps": eps + ratio,
          }
        )
  return rows


def _cells(line):
  return re.split(r"\s{2,}", line.strip())


def test_cells_are_mean_and_std_over_seeds():
  rows = _rows()
  text = report.pivot_table(
    rows,
    row_by=["defense"],
    column_by="ratio",
    value="rad",
    column_label=lambda v: f"{100 * v:g}%",
    side_columns={"clean acc": "acc"},
    span_columns={"epsilon": "eps"},
    row_header="defense",
  )
  header, rule, *lines = text.splitlines()
  assert _cells(header) == ["defense", "0%", "10%", "40%", "clean acc", "epsilon"]
  assert set(rule) <= {"-", " "}
  assert [_cells(line)[0] for line in lines] == ["vanilla", "dp"]  # order of first appearance
  for line in lines:
    cells = _cells(line)
    for column, ratio in zip(cells[1:4], ("0.0", "0.1", "0.4"), strict=True):
      values = [r["rad"] for r in rows if r["defense"] == cells[0] and r["ratio"] == ratio]
      mean, std = (float(x) for x in column.split(" ± "))
      assert mean == pytest.approx(np.mean(values), abs=1e-3)
      assert std == pytest.approx(np.std(values, ddof=1), abs=1e-3)
    assert cells[4] == "0.910 ± 0.010"  # over the seeds, not over the repeats
  assert _cells(lines[0])[5] == "inf"
  assert _cells(lines[1])[5] == "1.50–1.90"  # varies with the ratio: a range


def test_single_values_missing_values_and_defaults():
  rows = [
    {"d": "a", "r": 1, "v": 0.25},
    {"d": "a", "r": 2, "v": float("nan")},
    {"d": "b", "r": 1, "v": ""},
  ]
  header, _, a, b = report.pivot_table(rows, row_by=["d"], column_by="r", value="v").splitlines()
  assert _cells(header) == ["d", "r 1", "r 2"]
  assert _cells(a) == ["a", "0.250", "-"]
  assert _cells(b) == ["b", "-", "-"]


@pytest.mark.parametrize(
  "values, text",
  [
    ([0.5], "0.500"),
    ([1.0, 3.0], "2.00 ± 1.41"),
    ([0.01, 0.03], "0.0200 ± 0.0141"),
    ([math.inf, math.inf], "inf"),
    ([], "-"),
    ([123456.0, 123457.0], "1.23e+05 ± 0.707"),
  ],
)
def test_mean_pm_std(values, text):
  assert report.mean_pm_std(values) == text


def test_files_note_lists_tables_and_plots(tmp_path):
  for name in ("results.csv", "epochs.csv", "rad.png", "config.json", "notes.txt"):
    (tmp_path / name).write_text("x")
  note = report.files_note(tmp_path)
  assert note == (
    f"results in {tmp_path}/ (tables: epochs.csv, results.csv; plots: rad.png; config: config.json)"
  )
