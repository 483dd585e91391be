"""Tests experiments/gradient_analysis (§3 Fig. 1, §6.2 Fig. 4c/4f): `run` on tiny FashionMNIST slices.

The smoke preset runs one from-scratch LR scenario (collision, vanilla and
DP) and one re-training scenario (insertion, vanilla, from the cached
pre-trained MLP): gradients.csv, the summary, gradients.png, resuming and
config checks.
"""

import dataclasses
import math
import os

import numpy as np
import pytest

from experiments import common
from experiments import gradient_analysis as ga
from jaxshape import data
from jaxshape import results
from jaxshape import train


def _fmnist_available():
  try:
    data.load("fashion_mnist_3_4")
  except FileNotFoundError:
    return False
  return True


needs_fmnist = pytest.mark.skipif(
  not _fmnist_available(), reason="FashionMNIST not installed (run `make data`)"
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("gradients")
  config = dataclasses.replace(
    ga.PRESETS["smoke"],
    out=str(out),
    progress=False,
    scenarios=("collision_scratch", "insertion"),
    retrain_defenses=("vanilla",),
  )
  return config, ga.run(config)


def _expected_rows(config):
  total = 0
  for scenario in config.scenarios:
    total += (
      len(ga.settings(config, scenario))
      * len(ga.defense_grid(config, scenario))
      * config.seeds
      * config.epochs
      * len(ga.LAYERS)
    )
  return total


@needs_fmnist
def test_csv_schema_rows_and_values(smoke):
  config, out = smoke
  path = os.path.join(config.out, "gradients.csv")
  assert results.read_header(path) == list(ga.COLUMNS)
  assert ga.COLUMNS == (
    "scenario",
    "setting",
    "defense",
    "clip_norm",
    "noise_multiplier",
    "seed",
    "epoch",
    "layer",
    "clean_norm",
    "poison_norm",
    "ratio",
    "cosine",
    "test_acc",
  )
  rows = results.parse(results.read_csv(path))
  assert len(rows) == _expected_rows(config) == len(out["rows"])
  assert len(ga.defense_grid(config, "collision_scratch")) == 2  # vanilla, DP C=4 sigma=0
  assert ga.defense_grid(config, "insertion") == [common.VANILLA]
  for row in rows:
    assert row["layer"] in ga.LAYERS
    assert 1 <= row["epoch"] <= config.epochs
    for name in ("clean_norm", "poison_norm", "ratio", "test_acc"):
      assert math.isfinite(row[name]) and row[name] >= 0, row
    assert -1 - 1e-5 <= row["cosine"] <= 1 + 1e-5, row
    assert row["ratio"] == pytest.approx(row["poison_norm"] / row["clean_norm"], rel=1e-4)
    if row["defense"] == "vanilla":
      assert row["clip_norm"] == math.inf and row["noise_multiplier"] == 0
    else:
      assert row["clip_norm"] == 4.0
  # For the LR the last layer's kernel is all but the bias: both views nearly agree.
  by_key = {tuple(r[c] for c in ga.COLUMNS[:8]): r for r in rows}
  for key, row in by_key.items():
    if key[0] != "insertion" and key[7] == "all":
      last = by_key[(*key[:7], "last")]
      assert last["cosine"] == pytest.approx(row["cosine"], abs=0.02)
  for name in ("gradients.png", "config.json", "cache"):
    assert os.path.getsize(os.path.join(config.out, name)) > 0
  assert len(out["summary"]) == sum(
    len(ga.settings(config, s)) * len(ga.defense_grid(config, s)) for s in config.scenarios
  )


@needs_fmnist
def test_poisons_have_larger_gradients_than_clean_data(smoke):
  # Fig. 1 (upper row): at alpha 1 (a coat labelled dress) the mean poison
  # gradient is several times the clean one. On the smoke data the mean over
  # epochs of every (defense, seed) measured 7.8-19x (single epochs 1.4-21x).
  _, out = smoke
  ratios = {}
  for r in out["rows"]:
    if r["scenario"] == "collision_scratch":
      ratios.setdefault((r["defense"], r["seed"]), []).append(r["ratio"])
  assert len(ratios) == 4 and all(np.mean(v) > 3.0 for v in ratios.values()), ratios


@needs_fmnist
def test_rerun_skips_finished_jobs(smoke, monkeypatch):
  config, out = smoke
  path = os.path.join(config.out, "gradients.csv")
  before = (os.path.getmtime(path), open(path).read())

  def no_training(*args, **kwargs):
    raise AssertionError("a finished job was trained again")

  monkeypatch.setattr(train, "fit", no_training)
  monkeypatch.setattr(train, "train_step", no_training)
  again = ga.run(config)
  assert (os.path.getmtime(path), open(path).read()) == before
  assert len(again["rows"]) == len(out["rows"])


def test_bad_config_fails_loudly(tmp_path):
  for change in (
    {"scenarios": ("nope",)},
    {"defenses": ("adaptive",)},
    {"measure": "x"},
    {"clip_norms": (0.0,)},
  ):
    with pytest.raises(ValueError):
      ga.run(dataclasses.replace(ga.PRESETS["smoke"], out=str(tmp_path), **change))
