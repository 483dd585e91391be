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
  s = experiment.setup(config)
  calls = []
  real = experiment.train_model

  def spy(config_, s_, defense, key, x, y, init=None):
    clean = x.shape == s.x_N.shape and np.array_equal(x, s.x_N) and np.array_equal(y, s.y_N)
    calls.append({"n": len(y), "clean": clean, "key": int(experiment.jax.random.key_data(key)[-1])})
    return real(config_, s_, defense, key, x, y, init)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(experiment, "train_model", spy)
    out = backdoor.run(config)
  return config, out, calls


def test_schema_rows_and_counts(smoke):
  config, out, _ = smoke
  assert results.read_header(os.path.join(config.out, "results.csv")) == list(backdoor.COLUMNS)
  keys = {(r["attack"], r["poison_ratio"], r["seed"]) for r in out["rows"]}
  assert keys == {(a, p, 0) for a in config_lib.ATTACKS for p in config_lib.ratios(config, a)}
  for r in out["rows"]:
    assert r["n_poisons"] == round(r["poison_ratio"] * config.max_train)
    assert 0 <= r["asr"] <= 1 and 0 <= r["control_asr"] <= 1 and r["epsilon"] == float("inf")
  for name in ("asr_vs_ratio.png", "asr_vs_accuracy.png"):
    assert os.path.getsize(os.path.join(config.out, name)) > 5_000


def test_poisoned_sets_and_control_has_no_poison(smoke):
  config, _, _ = smoke
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
  # The control is trained on exactly the clean subset, with the poisoned victims' key.
  calls = smoke[2]
  control = [c for c in calls if c["n"] == config.max_train and c["clean"]]
  assert len(control) == 1 and control[0]["key"] == calls[0]["key"]
  assert {c["key"] for c in calls} == {control[0]["key"]}
  assert len(calls) == 1 + sum(len(config_lib.ratios(config, a)) for a in config.attacks)


def test_summary_agrees_and_rerun_trains_nothing(smoke):
  config, out, _ = smoke
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
