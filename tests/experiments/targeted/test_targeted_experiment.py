"""Smoke tests of experiments/targeted/experiment.py on FashionMNIST: both modes, CSV schemas,
the stop-at-first-success order, summaries that agree with the rows, reruns."""

import dataclasses
import os

import pytest

from experiments import targeted
from experiments.targeted import config as config_lib
from experiments.targeted import outcome
from experiments.targeted import retrain
from jaxshape import data
from jaxshape import results


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  try:
    data.load("fashion_mnist", download=False)
  except FileNotFoundError as e:
    pytest.skip(f"FashionMNIST is not installed (make data): {e}")
  out = tmp_path_factory.mktemp("targeted")
  # Both modes share one cache: the second pre-trains and crafts nothing (the same models
  # and poisons; q = attempts = max(poison_counts) = 2).
  cache_dir = os.path.join(out, "cache")
  return dataclasses.replace(
    targeted.PRESETS["smoke"], out=str(out), cache_dir=cache_dir, progress=False
  )


@pytest.mark.parametrize("mode", ["oneshot", "multipoison"])
def test_smoke_schema_rows_summary_and_rerun(smoke, mode):
  config = dataclasses.replace(smoke, mode=mode, out=os.path.join(smoke.out, mode))
  first = targeted.run(config)
  folder = f"{config.out}/fashion_mnist_mlp"
  assert results.read_header(f"{folder}/targeted.csv") == list(outcome.TARGETED_COLUMNS)
  assert results.read_header(f"{folder}/attempts.csv") == list(retrain.ATTEMPT_COLUMNS)
  assert results.read_header(f"{folder}/summary.csv") == list(outcome.SUMMARY_COLUMNS)
  rows = results.parse(results.read_csv(f"{folder}/targeted.csv"))
  n_def = len(config_lib.defenses(config))
  assert len(rows) == config.targets * n_def * len(config.attacks)
  attempts = results.parse(results.read_csv(f"{folder}/attempts.csv"))
  controls = [r for r in attempts if r["attack"] == retrain.CONTROL]
  assert len(controls) == config.targets * n_def  # one clean run per defense, all targets
  for row in rows:
    limit = config.attempts if mode == "oneshot" else len(config.poison_counts)
    assert 0 <= row["attempts_used"] <= limit
    if row["attack"] == "ceiling" and mode == "oneshot":
      assert row["attempts_used"] == 1
    if row["success"]:
      assert 1 <= row["success_epoch"] <= config.retrain_epochs
  summary = results.parse(results.read_csv(f"{folder}/summary.csv"))
  assert len(summary) == n_def * len(config.attacks)
  for s in summary:
    mine = [r for r in rows if r["attack"] == s["attack"] and r["defense"] == s["defense"]]
    mine = [
      r for r in mine if results.canonical(r["clip_norm"]) == results.canonical(s["clip_norm"])
    ]
    wins = sum(r["success"] for r in mine)
    assert (s["n"], s["successes"]) == (len(mine), wins)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(results.wilson_interval(wins, len(mine)))
  margins = results.read_csv(f"{folder}/margins.csv")
  assert len(margins) <= 90 and {"median_margin", "frac_under_2"} <= set(margins[0])
  second = targeted.run(config)  # a rerun re-trains nothing and gives the same table
  assert second["setups"]["fashion_mnist_mlp"]["new_rows"] == 0
  assert results.parse(results.read_csv(f"{folder}/targeted.csv")) == rows
  assert first["setups"]["fashion_mnist_mlp"]["new_rows"] == len(attempts)
  for name in ("targeted.png", "setup.json"):
    assert os.path.getsize(f"{folder}/{name}") > 100
  assert not os.path.exists(f"{config.out}/cache") and os.listdir(config.cache_dir)


def test_rerun_with_other_settings_is_refused(tmp_path):
  config = dataclasses.replace(targeted.PRESETS["smoke"], out=str(tmp_path))
  csv_path = tmp_path / "attempts.csv"
  targeted.check_resumable(config, str(tmp_path), str(csv_path))
  csv_path.write_text("x\n")
  targeted.check_resumable(config, str(tmp_path), str(csv_path))
  grown = dataclasses.replace(config, targets=5, seeds=3, clip_norms=(1.0, 4.0), attempts=9)
  targeted.check_resumable(grown, str(tmp_path), str(csv_path))
  with pytest.raises(ValueError, match="retrain_epochs"):
    targeted.check_resumable(
      dataclasses.replace(config, retrain_epochs=7), str(tmp_path), str(csv_path)
    )
