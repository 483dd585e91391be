"""Tests of experiments/targeted/outcome.py: the §6.1 success rule, aggregation, summaries."""

import numpy as np
import pytest

from experiments import common
from experiments.targeted import crafting
from experiments.targeted import outcome
from experiments.targeted import retrain
from jaxshape import results


@pytest.mark.parametrize(
  "pred_E, acc_E, clean_acc, expected",
  [
    ([4, 3, 4], [0.85, 0.84, 0.85], 0.85, (True, 2)),  # flipped at epoch 2, accuracy intact
    ([4, 3, 4], [0.85, 0.42, 0.85], 0.85, (False, None)),  # flipped only at RAD 0.5
    ([3, 4, 3], [0.40, 0.85, 0.83], 0.85, (True, 3)),  # any epoch counts
    ([3, 3], [0.95, 0.95], 1.0, (False, None)),  # RAD exactly 0.05 is not below 0.05
    ([3], [0.9501], 1.0, (True, 1)),
    ([5, 6, 2], [0.9, 0.9, 0.9], 0.9, (False, None)),  # not the attacker's class
    ([4, 3], [0.9, 0.9], 0.8, (True, 2)),  # negative RAD is fine
  ],
)
def test_decide_success(pred_E, acc_E, clean_acc, expected):
  assert outcome.decide_success(pred_E, acc_E, attacker_class=3, clean_acc=clean_acc) == expected


@pytest.mark.parametrize("pred_E, acc_E, clean", [([3, 3], [0.9], 0.9), ([3], [0.9], 0.0)])
def test_decide_success_rejects_bad_input(pred_E, acc_E, clean):
  with pytest.raises(ValueError):
    outcome.decide_success(pred_E, acc_E, 3, clean)


def test_first_flip_ignores_accuracy():
  assert outcome.first_flip([4, 4, 3, 3], 3) == 3
  assert outcome.first_flip([4, 4], 3) is None


def _plan(targets, attacks=("poison_frogs",)):
  t = len(targets)
  c = crafting.Crafted(
    np.asarray(targets, np.int32),
    np.zeros((t, 3, 2), np.float32),
    np.full((t, 3), -1, np.int32),
    np.zeros((t, 3), np.float32),
    np.full(t, 3, np.int32),
  )
  arm = retrain.Arm(common.VANILLA, common.VANILLA)
  crafted = {(a, 0): c for a in attacks}
  margins = [np.arange(t, dtype=np.float32) + 1.0]
  return retrain.Plan([arm], [0], [(common.VANILLA, 0)], [0.8], margins, crafted, [], {})


def _row(target, attack, attempt, n, success, margin, acc=0.8):
  return {
    "target_index": target,
    "attack": attack,
    **common.VANILLA.fields(),
    "seed": 0,
    "attempt": attempt,
    "n_poisons": n,
    "success": success,
    "success_epoch": 2 if success else None,
    "flip_epoch": 2 if success else None,
    "clean_acc": 0.8,
    "acc_final": acc,
    "acc_min": acc,
    "rad": (0.8 - acc) / 0.8,
    "initial_margin": 1.0,
    "margin_final": margin,
    "margin_min": margin,
  }


def test_aggregate_oneshot_first_success_shifts_and_control():
  plan = _plan([10, 11, 12])
  rows = [
    _row(10, "control", -1, 0, False, 5.0),
    _row(11, "control", -1, 0, True, -1.0),
    _row(12, "control", -1, 0, False, 4.0, acc=0.78),
    # Target 10: attempts 0 and 1 fail, 2 succeeds (rounds stop there).
    _row(10, "poison_frogs", 0, 1, False, 4.0),
    _row(10, "poison_frogs", 1, 1, False, 3.0),
    _row(10, "poison_frogs", 2, 1, True, -0.5, acc=0.79),
    # Target 11: the control flips it too; attempt 0 succeeds, so attempts 1 and 2 (run in
    # the same vmapped program) are masked: a sequential run would have stopped.
    _row(11, "poison_frogs", 0, 1, True, -2.0),
    _row(11, "poison_frogs", 1, 1, False, 3.0),
    _row(11, "poison_frogs", 2, 1, True, -9.0),
    # Target 12: all three fail.
    *[_row(12, "poison_frogs", a, 1, False, 3.5) for a in range(3)],
  ]
  out = {r["target_index"]: r for r in outcome.aggregate(plan, rows, "oneshot")}
  assert (out[10]["success"], out[10]["attempts_used"], out[10]["acc_final"]) == (True, 3, 0.79)
  assert out[10]["margin_shifts"] == "-1.000;-2.000;-5.500"
  assert out[10]["margin_shift_first"] == -1.0 and out[10]["margin_shift_best"] == -5.5
  assert out[11]["control_success"] is True
  assert (out[11]["attempts_used"], out[11]["margin_shifts"]) == (1, "-1.000")
  assert (out[12]["success"], out[12]["attempts_used"]) == (False, 3)
  assert [out[t]["initial_margin"] for t in (10, 11, 12)] == [1.0, 2.0, 3.0]
  (s,) = outcome.summarize(plan, list(out.values()))
  assert (s["n"], s["successes"], s["control_successes"], s["net_successes"]) == (3, 2, 1, 1)
  assert (s["ci_low"], s["ci_high"]) == pytest.approx(results.wilson_interval(2, 3))
  assert (s["control_ci_low"], s["control_ci_high"]) == pytest.approx(results.wilson_interval(1, 3))
  assert s["mean_attempts"] == 2.0
  assert s["utility_rad"] == pytest.approx(0.0)


def test_aggregate_multipoison_smallest_count_and_missing_poisons():
  plan = _plan([10, 11])
  rows = [
    _row(10, "control", -1, 0, False, 5.0),
    _row(11, "control", -1, 0, False, 5.0),
    _row(10, "poison_frogs", 0, 1, False, 4.0),
    _row(10, "poison_frogs", 0, 2, False, 2.0),
    _row(10, "poison_frogs", 0, 4, True, -1.0),
  ]
  out = {r["target_index"]: r for r in outcome.aggregate(plan, rows, "multipoison")}
  assert (out[10]["success"], out[10]["n_poisons_used"], out[10]["attempts_used"]) == (True, 4, 3)
  # Target 11 had no run (no usable poison): a failure with no re-training.
  assert (out[11]["success"], out[11]["n_poisons_used"], out[11]["rad"]) == (False, 0, None)
  (s,) = outcome.summarize(plan, list(out.values()))
  assert (s["successes"], s["mean_poisons"]) == (1, 4.0)


def test_aggregate_leaves_out_rows_beyond_the_configured_attempts_and_counts():
  plan = _plan([10])
  rows = [
    _row(10, "control", -1, 0, False, 5.0),
    _row(10, "poison_frogs", 0, 1, False, 4.0),
    _row(10, "poison_frogs", 1, 1, True, -1.0),  # from an earlier run with more attempts
  ]
  (one,) = outcome.aggregate(plan, rows, "oneshot", attempts=1)
  assert (one["success"], one["attempts_used"], one["margin_shifts"]) == (False, 1, "-1.000")
  (two,) = outcome.aggregate(plan, rows, "oneshot", attempts=2)
  assert (two["success"], two["attempts_used"]) == (True, 2)
  multi = [_row(10, "control", -1, 0, False, 5.0), _row(10, "poison_frogs", 0, 3, True, -1.0)]
  (m,) = outcome.aggregate(plan, multi, "multipoison", counts={1, 2})
  assert (m["success"], m["n_poisons_used"]) == (False, 0)
