"""Smoke test of experiments/shaping (§7): both parts on tiny FashionMNIST slices, the result
tables, the detector's filter, resuming, config checks, and the filter's threshold."""

import dataclasses
import math
import os

import numpy as np
import pytest

from experiments import shaping
from experiments.shaping import detection
from experiments.shaping import experiment
from experiments.shaping import report
from jaxshape import data
from jaxshape import results


def _fmnist_available():
  try:
    data.load("fashion_mnist_3_4")
  except FileNotFoundError:
    return False
  return True


needs_data = pytest.mark.skipif(
  not _fmnist_available(), reason="FashionMNIST not installed (run `make data`)"
)

TINY = dict(
  seeds=1,
  progress=False,
  clip_norms=(),
  noise_multipliers=(),
  centered_radii=(1.0,),
  cosine_thresholds=(),
  trim_fractions=(),  # the robust aggregators compile slowly; tests/shaping covers them
  median=False,
  quantiles=(),
  filter_fractions=(0.25,),
  max_train=200,
  mp_max_train=200,
  mp_max_test=200,
  mp_targets=2,
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("shaping")
  config = dataclasses.replace(shaping.PRESETS["smoke"], out=str(out), **TINY)
  return config, shaping.run(config)


@needs_data
def test_rows_cover_the_grid(smoke):
  config, res = smoke
  mechs = shaping.mechanisms(config)
  assert [m.name for m in mechs] == ["vanilla", "centered", "filter"]
  path = os.path.join(config.out, "results.csv")
  assert results.read_header(path) == list(shaping.RESULT_COLUMNS)
  rows = results.parse(results.read_csv(path))
  n_ind = len(config.attacks) * len(config.poison_ratios) * len(mechs) * config.seeds
  assert len(rows) == n_ind + len(mechs) * config.seeds
  for r in rows:
    if r["mechanism"] == "vanilla":
      assert r["cost"] == 0  # the cost is against vanilla's own clean run
    if r["metric_name"] == "success":
      assert 0 <= r["successes"] <= r["targets"] == config.mp_targets
      assert r["metric"] == r["successes"] / r["targets"]
    else:
      assert r["metric"] == pytest.approx((r["clean_acc"] - r["acc"]) / r["clean_acc"])


@needs_data
def test_filter_removes_the_top_fraction_and_reports_aucs(smoke):
  config, res = smoke
  for r in res["rows"]:
    if r["mechanism"] != "filter":
      assert r["n_removed"] == 0 and r.get("auc_norm") is None
      continue
    assert 0 <= r["auc_norm"] <= 1 and 0 <= r["auc_spectral"] <= 1
    if r["metric_name"] == "rad_best":
      n_set = config.max_train + r["n_poisons"]
      assert abs(r["n_removed"] - 0.25 * n_set) <= 1  # ties could only add, scores differ
      assert 0 <= r["n_poison_removed"] <= min(r["n_removed"], r["n_poisons"])
  det = results.parse(results.read_csv(os.path.join(config.out, "detect.csv")))
  assert all(0 <= d["auc_norm"] <= 1 for d in det if d["n_poisons"])


@needs_data
def test_tables_plots_and_resume(smoke):
  config, res = smoke
  for attack in (*config.attacks, config.mp_attack):
    assert os.path.getsize(os.path.join(config.out, f"pareto_{attack}.png")) > 0
  best = results.parse(results.read_csv(os.path.join(config.out, "best.csv")))
  groups = {(b["attack"], b["poison_ratio"]) for b in best}
  assert len(best) == len(report.BUDGETS) * len(groups) * 3
  vanilla = [b for b in best if b["mechanism"] == "vanilla"]
  assert all(b["metric"] == pytest.approx(b["vanilla_metric"]) for b in vanilla)
  before = results.read_csv(os.path.join(config.out, "indiscriminate_runs.csv"))
  again = shaping.run(config)  # every job is in the CSVs: nothing re-trains
  assert results.read_csv(os.path.join(config.out, "indiscriminate_runs.csv")) == before
  assert [r["metric"] for r in again["rows"]] == [r["metric"] for r in res["rows"]]


@pytest.mark.parametrize(
  "change",
  [
    {"trim_fractions": (0.6,)},
    {"cosine_thresholds": (1.5,)},
    {"poison_ratios": (0.0,)},
    {"filter_score": "magic"},
    {"parts": ()},
    {"cosine_clip": 0.0},
  ],
)
def test_bad_config_raises_before_writing(tmp_path, change):
  out = tmp_path / "never"
  config = dataclasses.replace(shaping.PRESETS["smoke"], out=str(out), **change)
  with pytest.raises(ValueError):
    shaping.run(config)
  assert not out.exists()


def test_threshold_removes_the_top_fraction():
  scores = np.random.default_rng(0).permutation(100).astype(float)
  for fraction, k in ((0.1, 10), (0.25, 25), (0.001, 0)):
    t = detection.threshold(scores, fraction)
    assert np.sum(scores > t) == k
  assert detection.threshold(scores, 0.001) == math.inf


def test_mechanism_labels_and_hyperparameters():
  mechs = shaping.mechanisms(shaping.PRESETS["quick"])
  names = [m.name for m in mechs]
  assert names == sorted(names, key=shaping.MECHANISMS.index)  # grouped in table order
  by_label = {m.label: m for m in mechs}
  assert by_label["centered tau=0.5"].defense.clip_norm == 0.5
  assert by_label["trimmed beta=0.3"].defense.shaping_param == 0.3
  assert by_label["filter removed=0.1"].defense.kind == "vanilla"
  assert math.isnan(by_label["median"].hyperparameter)
  assert len(by_label) == len(mechs)  # labels are distinct


def test_other_settings_in_the_same_out_are_refused(tmp_path):
  config = dataclasses.replace(shaping.PRESETS["smoke"], out=str(tmp_path), parts=("multipoison",))
  experiment.check_resumable(config)
  experiment.check_resumable(config)  # the same settings resume
  with pytest.raises(ValueError, match="epochs"):
    experiment.check_resumable(dataclasses.replace(config, epochs=3))
