"""Tests experiments/utility.py (App. F, Fig. 12) on tiny slices, with the FashionMNIST stand-ins."""

import dataclasses
import math
import os

import pytest

from experiments import utility
from jaxshape import data
from jaxshape import results
from jaxshape import train


def _fmnist_available():
  try:
    data.load("fashion_mnist_3_4")
  except FileNotFoundError:
    return False
  return True


def _missing(name):
  try:
    data.load(name, download=False)
  except FileNotFoundError:
    return True
  return False


needs_fmnist = pytest.mark.skipif(
  not _fmnist_available(), reason="FashionMNIST not installed (run `make data`)"
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("utility")
  # The CNN's compilation alone takes most of a minute on two busy cores; the
  # LR and the MLP exercise the same code path.
  config = dataclasses.replace(
    utility.PRESETS["smoke"], out=str(out), progress=False, models=("lr", "mlp")
  )
  return config, utility.run(config)


@needs_fmnist
def test_csv_schema_rows_and_epsilon(smoke):
  config, out = smoke
  path = os.path.join(config.out, "utility.csv")
  assert results.read_header(path) == list(utility.COLUMNS)
  assert utility.COLUMNS == (
    "model",
    "dataset",
    "defense",
    "clip_norm",
    "noise_multiplier",
    "seed",
    "test_acc",
    "epsilon",
  )
  rows = results.parse(results.read_csv(path))
  grid = utility.defense_grid(config)
  assert len(grid) == 1 + len(config.clip_norms) * len(config.noise_multipliers)
  assert len(rows) == len(config.models) * len(grid) * config.seeds == len(out["rows"])
  for row in rows:
    assert 0 <= row["test_acc"] <= 1
    if row["defense"] == "vanilla":
      assert row["clip_norm"] == math.inf and row["epsilon"] == math.inf
    elif row["noise_multiplier"] == 0:
      assert row["epsilon"] == math.inf
    else:
      assert 0 < row["epsilon"] < math.inf
  # More noise, less privacy loss (same sampling rate and steps).
  eps = utility.epsilon(config, 0.5, 300, 1), utility.epsilon(config, 1.0, 300, 1)
  assert eps[0] > eps[1] > 0
  for name in ("utility.png", "config.json", "datasets.json"):
    assert os.path.getsize(os.path.join(config.out, name)) > 0


@needs_fmnist
def test_stand_ins_are_declared(smoke):
  config, out = smoke
  notes = results.read_json(os.path.join(config.out, "datasets.json"))
  assert set(notes) == set(config.models)
  by_model = {r["model"]: r["dataset"] for r in out["rows"]}
  assert by_model["mlp"] == "fashion_mnist" and "INSTEAD" not in notes["mlp"]
  if _missing("purchase100"):
    assert by_model["lr"] == "fashion_mnist_3_4" and "INSTEAD OF purchase100" in notes["lr"]


@needs_fmnist
def test_dp_lr_learns(smoke):
  # LR on 300 FashionMNIST-3/4 points, one epoch of DP-SGD at C = 4: measured
  # 0.84-0.87 test accuracy with and without noise (sigma 1); chance is 0.5.
  _, out = smoke
  lr = [
    r for r in out["rows"] if r["model"] == "lr" and r["defense"] == "dp" and r["clip_norm"] == 4.0
  ]
  assert lr and all(r["test_acc"] > 0.7 for r in lr)


@needs_fmnist
def test_rerun_skips_finished_jobs(smoke, monkeypatch):
  config, out = smoke
  path = os.path.join(config.out, "utility.csv")
  before = (os.path.getmtime(path), open(path).read())

  def no_training(*args, **kwargs):
    raise AssertionError("a finished job was trained again")

  monkeypatch.setattr(train, "fit", no_training)
  again = utility.run(config)
  assert (os.path.getmtime(path), open(path).read()) == before
  assert len(again["rows"]) == len(out["rows"])


@pytest.mark.skipif(not _missing("purchase100"), reason="Purchase-100 is installed")
def test_paper_preset_fails_without_the_papers_data(tmp_path):
  config = dataclasses.replace(utility.PRESETS["paper"], out=str(tmp_path), models=("lr",))
  with pytest.raises(FileNotFoundError):
    utility.run(config)


def test_bad_config_fails_loudly(tmp_path):
  for change in (
    {"models": ("svm",)},
    {"clip_norms": (-1.0,)},
    {"noise_multipliers": (-0.1,)},
    {"epochs": 0},
  ):
    with pytest.raises(ValueError):
      utility.run(dataclasses.replace(utility.PRESETS["smoke"], out=str(tmp_path), **change))
