"""Smoke test of experiments/indiscriminate (§6.2) on a small slice of FashionMNIST-3/4: run(),
results.csv, the printed table (report), crafting (Steinhardt vs label flip) and resuming."""

import dataclasses
import math
import os
import re

import pytest

from experiments import indiscriminate
from jaxshape import accounting
from jaxshape import data
from jaxshape import results


def _fmnist_available():
  try:
    data.load("fashion_mnist_3_4")
  except FileNotFoundError:
    return False
  return True


pytestmark = pytest.mark.skipif(
  not _fmnist_available(), reason="FashionMNIST not installed (run `make data`)"
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("indiscriminate")
  config = dataclasses.replace(
    indiscriminate.PRESETS["smoke"],
    out=str(out),
    progress=False,
    seeds=2,
    poison_ratios=(0.0, 0.4),
    clip_norms=(4.0,),
    noise_multipliers=(1e-3,),
    adaptive_multipliers=(0.1,),
    max_train=300,
    steinhardt_iterations=3,
  )
  return config, indiscriminate.run(config)


def test_results_schema_and_rows(smoke):
  config, out = smoke
  path = os.path.join(config.out, "results.csv")
  assert results.read_header(path) == list(indiscriminate.RESULT_COLUMNS)
  rows = results.parse(results.read_csv(path))
  grid = indiscriminate.defenses(config)
  assert len(grid) == 4  # vanilla, clip C=4 (also the noise rows' C), noise, adaptive
  assert len(rows) == len(config.attacks) * len(config.poison_ratios) * len(grid) * config.seeds
  for row in rows:
    assert 0 <= row["acc_best"] <= 1 and row["acc_final"] <= row["acc_best"] + 1e-9
    if row["poison_ratio"] == 0:
      assert row["rad_best"] == 0 and row["n_poisons"] == 0
    else:
      assert row["n_poisons"] == round(0.4 * 300)
    if row["defense"] == "vanilla" or (row["defense"] == "dp" and row["noise_multiplier"] == 0):
      assert row["epsilon"] == math.inf
    elif row["defense"] == "dp":
      assert 0 < row["epsilon"] < math.inf
    else:
      assert math.isnan(row["epsilon"])
  epoch_rows = results.read_csv(os.path.join(config.out, "epochs.csv"))
  assert len(epoch_rows) == len(rows) * config.epochs
  for name in ("rad.png", "train_acc.png", "pca.png", "config.json"):
    assert os.path.getsize(os.path.join(config.out, name)) > 0


def test_steinhardt_poisons_are_few_distinct_points(smoke):
  _, out = smoke
  by_attack = {r["attack"]: r for r in out["pca"]}
  assert by_attack["steinhardt"]["n_distinct"] <= 4
  assert by_attack["label_flip"]["n_distinct"] > 100


def test_rerun_skips_finished_jobs(smoke):
  config, out = smoke
  before = os.path.getmtime(os.path.join(config.out, "epochs.csv"))
  again = indiscriminate.run(dataclasses.replace(config, attacks=("label_flip",)))
  assert os.path.getmtime(os.path.join(config.out, "epochs.csv")) == before
  assert len(again["rows"]) == len(out["rows"]) // 2


def test_demo_table_is_readable(smoke):
  """`make demo`'s final table: defenses x poison ratios, RAD mean ± std, clean acc, epsilon."""
  config, out = smoke
  text = indiscriminate.summary_table(out["rows"], config)
  for attack in config.attacks:
    assert f"{attack}: RAD at the best epoch, mean ± std over {config.seeds} seeds" in text
  header = next(line for line in text.splitlines() if line.startswith("defense"))
  assert header.split() == ["defense", "0%", "poisons", "40%", "poisons", "clean", "acc", "epsilon"]
  labels = [
    line.split("  ")[0]
    for line in text.splitlines()
    if line.startswith(("vanilla", "clip", "noise", "adaptive"))
  ]
  assert labels == ["vanilla", "clip C=4", "noise C=4 s=0.001", "adaptive C=4 s=0.1"] * len(
    config.attacks
  )
  number = r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?"
  mean_std = re.compile(rf"^{number} ± {number}$|^{number}$")
  for line in text.splitlines():
    if line.startswith(("vanilla", "clip", "noise", "adaptive")):
      cells = re.split(r"\s{2,}", line.strip())
      assert len(cells) == 5, line  # label, two ratios, clean acc, epsilon
      assert all(mean_std.match(c) for c in cells[1:4]), line
      assert re.match(rf"^({number}(–{number})?|inf|-)$", cells[4]), line
  # epsilon assumes the sampling training used (shuffled fixed batches), and says so.
  assert accounting.assumption(sampling="shuffle") in text
