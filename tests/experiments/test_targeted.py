"""Tests of experiments/targeted.py (§6.3-§6.5): the success rule, aggregation, a smoke run."""

import dataclasses
import math
import os

import numpy as np
import pytest

from experiments import _targeted_lib as lib
from experiments import targeted
from jaxshape import data
from jaxshape import results


@pytest.mark.parametrize(
  "pred_E, acc_E, clean_acc, expected",
  [
    # Flipped at epoch 2 with the accuracy intact.
    ([4, 3, 4], [0.85, 0.84, 0.85], 0.85, (True, 2)),
    # Flipped only while the accuracy had collapsed (RAD 0.5): not a success.
    ([4, 3, 4], [0.85, 0.42, 0.85], 0.85, (False, None)),
    # Any epoch counts: a collapsed flip at epoch 1, a clean one at epoch 3.
    ([3, 4, 3], [0.40, 0.85, 0.83], 0.85, (True, 3)),
    # RAD exactly 0.05 is not below 0.05.
    ([3, 3], [0.95, 0.95], 1.0, (False, None)),
    # RAD just below 0.05 is.
    ([3], [0.9501], 1.0, (True, 1)),
    # Misclassified, but not as the attacker's class.
    ([5, 6, 2], [0.9, 0.9, 0.9], 0.9, (False, None)),
    # Accuracy above the clean model's (negative RAD) is fine.
    ([4, 3], [0.9, 0.9], 0.8, (True, 2)),
    # Never flipped.
    ([4, 4, 4], [1.0, 1.0, 1.0], 1.0, (False, None)),
  ],
)
def test_decide_success(pred_E, acc_E, clean_acc, expected):
  assert lib.decide_success(pred_E, acc_E, attacker_class=3, clean_acc=clean_acc) == expected


def test_decide_success_uses_the_clean_accuracy_as_reference():
  # acc 0.80 is RAD 0.0588 against 0.85 (fails) but RAD 0.0476 against 0.84 (passes).
  assert lib.decide_success([3], [0.80], 3, clean_acc=0.85) == (False, None)
  assert lib.decide_success([3], [0.80], 3, clean_acc=0.84) == (True, 1)


@pytest.mark.parametrize("pred_E, acc_E, clean", [([3, 3], [0.9], 0.9), ([3], [0.9], 0.0)])
def test_decide_success_rejects_bad_input(pred_E, acc_E, clean):
  with pytest.raises(ValueError):
    lib.decide_success(pred_E, acc_E, 3, clean)


def test_first_flip_ignores_accuracy():
  assert lib.first_flip([4, 4, 3, 3], 3) == 3
  assert lib.first_flip([4, 4], 3) is None


def test_arms_pair_defenses_by_scenario():
  dp = lib.Defense("dp", 4.0, 0.01)
  grid = [lib.VANILLA, dp]
  assert lib.make_arms("standard", grid) == [lib.Arm(lib.VANILLA, lib.VANILLA), lib.Arm(dp, dp)]
  assert [a.key for a in lib.make_arms("vanilla_then_dp", grid)] == grid
  assert [a.pre for a in lib.make_arms("dp_then_vanilla", grid)] == grid
  assert [a.key for a in lib.make_arms("dp_then_vanilla", grid)] == grid
  config = targeted.scenario_defaults(
    dataclasses.replace(targeted.PRESETS["quick"], scenario="vanilla_then_dp")
  )
  assert lib.defense_grid(config) == [lib.VANILLA, lib.Defense("dp", 4.0, 0.01)]


def _plan(targets_T, arms):
  crafted = lib.Crafted(
    np.asarray(targets_T, np.int32),
    np.zeros((len(targets_T), 1)),
    np.full((len(targets_T), 1), -1),
    np.zeros((len(targets_T), 1)),
    np.ones(len(targets_T), np.int32),
  )
  models_m = list(dict.fromkeys((a.pre, 0) for a in arms))
  return lib.Plan(arms, [0], models_m, [0.8] * len(models_m), [crafted] * len(models_m), [], {})


def _attempt(target, attempt, n, success, epoch, acc, d=lib.VANILLA):
  return {
    "target_index": target,
    **d.fields(),
    "seed": 0,
    "attempt": attempt,
    "n_poisons": n,
    "success": success,
    "success_epoch": epoch,
    "flip_epoch": epoch,
    "clean_acc": 0.8,
    "acc_final": acc,
    "acc_min": acc,
    "rad": (0.8 - acc) / 0.8,
  }


def test_aggregate_oneshot_any_attempt():
  plan = _plan([10, 11, 12], [lib.Arm(lib.VANILLA, lib.VANILLA)])
  rows = [
    _attempt(10, 0, 1, False, None, 0.80),
    _attempt(10, 1, 1, True, 5, 0.79),
    _attempt(10, 2, 1, True, 2, 0.78),
    _attempt(11, 0, 1, False, None, 0.70),
    # Target 12 had no usable poison: no attempt rows at all.
    _attempt(10, -1, 0, False, None, 0.81),
    _attempt(11, -1, 0, True, 1, 0.81),
  ]
  out, controls = lib.aggregate(plan, rows, "oneshot")
  by_target = {r["target_index"]: r for r in out}
  assert by_target[10]["success"] and by_target[10]["success_epoch"] == 2
  assert by_target[10]["acc_final"] == 0.78  # the attempt that succeeded first
  assert not by_target[11]["success"] and by_target[11]["acc_final"] == 0.70
  assert by_target[12]["n_poisons_used"] == 0 and by_target[12]["rad"] is None
  assert len(controls) == 2
  (summary,) = lib.summarize(plan, out, controls)
  assert (summary["successes"], summary["n"]) == (1, 3)
  assert (summary["control_successes"], summary["control_n"]) == (1, 2)
  assert (summary["ci_low"], summary["ci_high"]) == results.wilson_interval(1, 3)


def test_aggregate_multipoison_smallest_k():
  plan = _plan([10, 11], [lib.Arm(lib.VANILLA, lib.VANILLA)])
  rows = [
    _attempt(10, 0, 1, False, None, 0.80),
    _attempt(10, 0, 2, False, None, 0.80),
    _attempt(10, 0, 4, True, 3, 0.79),
    _attempt(11, 0, 1, False, None, 0.80),
    _attempt(11, 0, 2, False, None, 0.75),
  ]
  out, _ = lib.aggregate(plan, rows, "multipoison")
  by_target = {r["target_index"]: r for r in out}
  assert by_target[10]["success"] and by_target[10]["n_poisons_used"] == 4
  assert not by_target[11]["success"] and by_target[11]["n_poisons_used"] == 2
  (summary,) = lib.summarize(plan, out, [])
  assert summary["mean_poisons"] == 4.0


@pytest.fixture(scope="module")
def smoke_config(tmp_path_factory):
  try:
    data.load("fashion_mnist", download=False)
  except FileNotFoundError as e:
    pytest.skip(f"FashionMNIST is not installed (make data): {e}")
  out = tmp_path_factory.mktemp("targeted")
  return dataclasses.replace(targeted.PRESETS["smoke"], out=str(out), progress=False)


def test_targeted_smoke_schema_counts_summary_and_rerun(smoke_config):
  config = smoke_config
  first = targeted.run(config)
  folder = f"{config.out}/fashion_mnist_mlp"
  path = f"{folder}/targeted.csv"
  assert results.read_header(path) == list(targeted.lib.TARGETED_COLUMNS)
  assert results.read_header(path) == [
    "target_index",
    "defense",
    "clip_norm",
    "noise_multiplier",
    "seed",
    "success",
    "success_epoch",
    "n_poisons_used",
    "clean_acc",
    "acc_final",
    "rad",
  ]
  rows = results.parse(results.read_csv(path))
  grid = lib.defense_grid(config)
  assert len(rows) == config.targets * len(grid) * config.seeds
  for row in rows:
    assert row["success"] in (True, False)
    assert row["n_poisons_used"] in (0, 1)
    assert 0.0 <= row["clean_acc"] <= 1.0
    if row["success"]:
      assert 1 <= row["success_epoch"] <= config.retrain_epochs
  # The Wilson summary agrees with the rows.
  summary = results.parse(results.read_csv(f"{folder}/summary.csv"))
  assert len(summary) == len(grid)
  for s in summary:
    mine = [
      r
      for r in rows
      if r["defense"] == s["defense"]
      and math.isclose(r["clip_norm"], s["clip_norm"])
      and math.isclose(r["noise_multiplier"], s["noise_multiplier"])
    ]
    wins = sum(r["success"] for r in mine)
    assert (s["n"], s["successes"]) == (len(mine), wins)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(results.wilson_interval(wins, len(mine)))
  attempts = results.read_csv(f"{folder}/attempts.csv")
  # One re-training per (target, defense) plus one control per defense, each control giving a
  # row per target.
  assert len(attempts) == 2 * config.targets * len(grid)
  assert first["setups"]["fashion_mnist_mlp"]["new_rows"] == len(attempts)
  # A rerun re-trains nothing and reproduces the same table.
  second = targeted.run(config)
  assert second["setups"]["fashion_mnist_mlp"]["new_rows"] == 0
  assert results.parse(results.read_csv(path)) == rows
  assert second["seconds"] < first["seconds"]
  for name in ("targeted.png", "setup.json", "summary.csv", "attempts.csv"):
    assert os.path.getsize(f"{folder}/{name}") > 100
  assert results.read_header(f"{config.out}/summary.csv")[:2] == ["dataset", "model"]


def test_rerun_with_other_settings_is_refused(tmp_path):
  config = dataclasses.replace(targeted.PRESETS["smoke"], out=str(tmp_path))
  csv_path = tmp_path / "attempts.csv"
  targeted.check_resumable(config, str(tmp_path), str(csv_path))
  csv_path.write_text("x\n")
  targeted.check_resumable(config, str(tmp_path), str(csv_path))
  # More targets, seeds or defenses only add rows: allowed.
  targeted.check_resumable(
    dataclasses.replace(config, targets=5, seeds=3, clip_norms=(1.0, 4.0)),
    str(tmp_path),
    str(csv_path),
  )
  with pytest.raises(ValueError, match="retrain_epochs"):
    targeted.check_resumable(
      dataclasses.replace(config, retrain_epochs=7), str(tmp_path), str(csv_path)
    )


def test_displaced_points_avoid_base_and_target_classes_and_are_fixed():
  y_N = np.repeat(np.arange(10), 50)
  idx = lib.displaced_points(y_N, 8, (3, 4))
  assert idx.dtype == np.int32 and idx.shape == (8,)
  assert len(set(idx.tolist())) == 8
  assert not np.isin(y_N[idx], [3, 4]).any()
  # Poisons 1..k displace the first k of one fixed order (nested, reproducible).
  np.testing.assert_array_equal(lib.displaced_points(y_N, 8, (3, 4)), idx)
  np.testing.assert_array_equal(lib.displaced_points(y_N, 3, (3, 4)), idx[:3])
  with pytest.raises(ValueError):
    lib.displaced_points(np.array([3, 4, 3, 1]), 2, (3, 4))


def test_retrain_seed_is_distinct_per_attempt_and_keeps_attempt_zero():
  assert lib.retrain_seed(0, 0) == 10_000 and lib.retrain_seed(2, 0) == 10_002
  seeds = {lib.retrain_seed(s, a) for s in range(5) for a in range(100)}
  assert len(seeds) == 500 and max(seeds) < 2**31
  with pytest.raises(ValueError):
    lib.retrain_seed(0, -1)


def test_controls_pair_with_attempts():
  plan = _plan([10, 11], [lib.Arm(lib.VANILLA, lib.VANILLA)])
  ctx = lib.Context(*[None] * 3, 0.08, *[None] * 8)
  jobs = lib.control_jobs(plan, ctx, runs=3)
  assert [j.key["attempt"] for j in jobs] == [-1, -2, -3]
  assert [j.seed for j in jobs] == [lib.retrain_seed(0, a) for a in range(3)]
  assert all(j.key["n_poisons"] == 0 and j.values["n_poisons"] == 0 for j in jobs)
  # Their rows carry the control's attempt number.
  to_rows = lib.make_to_rows(plan, 3)
  outputs = {
    "test_acc": np.array([0.8, 0.8]),
    "pred_T": np.array([[4, 3], [4, 4]]),
    "margin_T": np.array([[2.0, -0.5], [1.5, 0.5]]),
  }
  rows = to_rows(jobs[1], outputs)
  assert [r["attempt"] for r in rows] == [-2, -2]
  assert [r["success"] for r in rows] == [False, True]
  assert [(r["margin_final"], r["margin_min"]) for r in rows] == [(1.5, 1.5), (0.5, -0.5)]


def test_margin_shift_pairs_each_attempt_with_its_control():
  plan = _plan([10], [lib.Arm(lib.VANILLA, lib.VANILLA)])

  def row(attempt, n, margin, margin_min=None):
    r = _attempt(10, attempt, n, False, None, 0.8)
    return {**r, "margin_final": margin, "margin_min": margin if margin_min is None else margin_min}

  rows = [row(0, 1, 1.0), row(1, 1, 4.0), row(-1, 0, 3.0, 2.0), row(-2, 0, 5.0, 1.0)]
  out, controls = lib.aggregate(plan, rows, "oneshot")
  # Attempt 0 vs control -1: 1 - 3 = -2; attempt 1 vs control -2: 4 - 5 = -1.
  (summary,) = lib.summarize(plan, out, controls)
  assert summary["margin_shift"] == pytest.approx(-1.5)
  assert summary["control_margin"] == pytest.approx(1.0)  # smallest over control runs


def test_aggregate_controls_use_the_any_of_n_rule():
  plan = _plan([10, 11, 12], [lib.Arm(lib.VANILLA, lib.VANILLA)])
  rows = [_attempt(t, 0, 1, False, None, 0.80) for t in (10, 11, 12)]
  rows += [
    _attempt(10, -1, 0, False, None, 0.81),
    _attempt(10, -2, 0, True, 4, 0.79),
    _attempt(10, -3, 0, True, 2, 0.78),
    _attempt(11, -1, 0, False, None, 0.81),
    _attempt(11, -2, 0, False, None, 0.79),
    _attempt(11, -3, 0, False, None, 0.78),
    _attempt(12, -1, 0, False, None, 0.81),
    _attempt(12, -2, 0, False, None, 0.79),
    _attempt(12, -3, 0, False, None, 0.78),
  ]
  _, controls = lib.aggregate(plan, rows, "oneshot")
  by_target = {r["target_index"]: r for r in controls}
  assert len(controls) == 3
  assert by_target[10]["success"] and by_target[10]["success_epoch"] == 2
  assert not by_target[11]["success"]
  # Accuracy of control run 0 (attempt -1), the one paired with attempt 0.
  assert by_target[10]["acc_final"] == 0.81 and by_target[10]["control_runs"] == 3
  (summary,) = lib.summarize(plan, [], controls)
  assert (summary["control_successes"], summary["control_n"]) == (1, 3)
  assert summary["control_runs"] == 3


def test_quick_oneshot_preset_is_the_mlp_with_several_attempts():
  config = targeted.preset("quick", "oneshot")
  assert config.mode == "oneshot" and config.models == ("mlp",)
  assert config.attempts == targeted.QUICK_ATTEMPTS > 1
  assert config.retrain_epochs == targeted.QUICK_RETRAIN_EPOCHS > 8
  assert config.craft_iters == 10_000 and config.max_feature_distance == 3.5
  assert targeted.control_runs(config) == config.attempts
  assert len(lib.defense_grid(config)) == 4 and config.targets == 20
  # The multi-poison quick run is unchanged: LR and MLP, 8 epochs, 4 controls.
  multi = targeted.preset("quick", "multipoison")
  assert multi.models == ("lr", "mlp") and multi.retrain_epochs == 8
  assert targeted.control_runs(multi) == 4


def test_rerun_of_a_folder_without_run_json_is_refused(tmp_path):
  config = dataclasses.replace(targeted.PRESETS["smoke"], out=str(tmp_path))
  (tmp_path / "attempts.csv").write_text("x\n")
  with pytest.raises(ValueError, match="unknown settings"):
    targeted.check_resumable(config, str(tmp_path), str(tmp_path / "attempts.csv"))
