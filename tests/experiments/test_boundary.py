"""Smoke test of experiments/boundary.py (Appendix D) on its smoke preset."""

import dataclasses
import os

from experiments import boundary
from jaxshape import results


def test_boundary_smoke(tmp_path):
  config = dataclasses.replace(boundary.PRESETS["smoke"], out=str(tmp_path), progress=False)
  out = boundary.run(config)
  rows = results.read_csv(tmp_path / "boundary.csv")
  assert results.read_header(tmp_path / "boundary.csv") == list(boundary.COLUMNS)
  assert len(rows) == 2 * config.seeds
  assert {r["defense"] for r in rows} == {"vanilla", "dp"}
  for row in results.parse(rows):
    assert 0.0 <= row["test_acc"] <= 1.0
  dp = [r for r in out["rows"] if r["defense"] == "dp"]
  vanilla = [r for r in out["rows"] if r["defense"] == "vanilla"]
  assert all(r["epsilon"] > 0 and r["epsilon"] < float("inf") for r in dp)
  assert all(r["epsilon"] == float("inf") for r in vanilla)
  # Even a few epochs beat chance on two moons.
  assert min(r["test_acc"] for r in out["rows"]) > 0.6
  assert os.path.getsize(tmp_path / "boundary.png") > 10_000
  assert os.path.exists(tmp_path / "config.json")
