"""Tests experiments/backdoor on a tiny real-FashionMNIST run (every attack, vanilla, direct):
the CSV schema, one row per (attack, ratio, seed), poison counts and clean labels exact, the
control trained without any poison on the victims' key, a summary that agrees with the rows,
a rerun that trains nothing, the finetune protocol, and bad configs refused before anything
is written."""

import dataclasses
import os

import numpy as np
import pytest

from experiments import backdoor
from experiments.backdoor import config as config_lib
from experiments.backdoor import experiment
from experiments.backdoor import report
from jaxshape import data
from jaxshape import results


def _tiny(out, **kw):
  return dataclasses.replace(backdoor.PRESETS["smoke"], out=str(out), progress=False,
                             max_train=200, noise_multipliers=(), **kw)  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  try:
    data.load("fashion_mnist", download=False)
  except FileNotFoundError as e:
    pytest.skip(f"FashionMNIST is not installed (make data): {e}")
  config = _tiny(tmp_path_factory.mktemp("backdoor"))
  return config, backdoor.run(config)


def test_schema_rows_and_counts(smoke):
  config, out = smoke
  assert results.read_header(os.path.join(config.out, "results.csv")) == list(backdoor.COLUMNS)
  keys = {(r["attack"], r["poison_ratio"], r["seed"]) for r in out["rows"]}
  assert keys == {(a, p, 0) for a in config_lib.ATTACKS for p in config_lib.ratios(config, a)}
  for r in out["rows"]:
    assert r["n_poisons"] == round(r["poison_ratio"] * config.max_train)
    assert 0 <= r["asr"] <= 1 and 0 <= r["control_asr"] <= 1 and r["epsilon"] == float("inf")
  for name in ("asr_vs_ratio.png", "asr_vs_accuracy.png"):
    assert os.path.getsize(os.path.join(config.out, name)) > 5_000


def test_poisoned_sets_and_control_has_no_poison(smoke):
  config, _ = smoke
  s = experiment.setup(config)
  cache = experiment.common.ParamsCache(os.path.join(config.out, "cache"))
  by_name = {a.name: a for a in experiment.attacks(config, s, cache)}
  nar = by_name["narcissus"]
  assert len(nar.y_train) == config.max_train
  np.testing.assert_array_equal(nar.y_train, s.y_N)  # clean label: labels unchanged
  changed = np.any(nar.x_train != s.x_N, axis=(1, 2, 3))
  assert changed.sum() <= nar.n_poisons and np.all(s.y_N[changed] == config.target_class)
  assert np.abs(nar.x_train - s.x_N).max() <= config.epsilon + 1e-6
  blend = by_name["blend"]
  assert len(blend.y_train) == config.max_train + blend.n_poisons
  np.testing.assert_array_equal(blend.y_train[config.max_train :], config.target_class)
  # The control of (vanilla, seed 0) is the model trained on the clean subset: retraining it
  # on s.x_N with the victims' key gives the cached parameters exactly.
  key = experiment.jax.random.key(experiment.VICTIM_SEED)
  params = experiment.train_model(config, s, experiment.common.VANILLA, key, s.x_N, s.y_N)
  files = [f for f in os.listdir(os.path.join(config.out, "cache")) if f.startswith("control")]
  assert len(files) == 1
  with np.load(os.path.join(config.out, "cache", files[0])) as f:
    cached = [f[k] for k in sorted(f.files) if k.startswith("leaf_")]
  leaves = experiment.jax.tree.leaves(params)
  assert sorted(np.asarray(x).size for x in leaves) == sorted(x.size for x in cached)
  assert np.allclose(sum(float(np.sum(x)) for x in leaves), sum(float(x.sum()) for x in cached))


def test_summary_agrees_and_rerun_trains_nothing(smoke):
  config, out = smoke
  assert report.summarise(out["rows"]) == out["summary"]
  for row in out["summary"]:
    assert row["seeds"] == 1 and row["asr_low"] <= row["asr"] <= row["asr_high"]
  before = os.path.getmtime(os.path.join(config.out, "results.csv"))
  again = backdoor.run(config)
  assert os.path.getmtime(os.path.join(config.out, "results.csv")) == before
  assert again["rows"] == out["rows"]


def test_finetune_protocol(tmp_path):
  config = _tiny(tmp_path, attacks=("blend",), protocol="finetune")
  rows = backdoor.run(config)["rows"]
  assert [(r["attack"], r["protocol"]) for r in rows] == [("blend", "finetune")]


@pytest.mark.parametrize(
  "change, match",
  [
    ({"attacks": ("nope",)}, "--attacks"),
    ({"protocol": "both"}, "--protocol"),
    ({"blend_ratios": (0.0,)}, "--blend_ratios"),
    ({"attacks": ()}, "--attacks"),
  ],
)
def test_bad_config_writes_nothing(tmp_path, change, match):
  config = dataclasses.replace(_tiny(tmp_path / "out"), **change)
  with pytest.raises(ValueError, match=match):
    backdoor.run(config)
  assert not os.path.exists(tmp_path / "out")
