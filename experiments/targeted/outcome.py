"""The success rule (§6.1) and the aggregation of re-trainings into targets and summaries.

attempts.csv holds one row per re-training and target (`retrain.ATTEMPT_COLUMNS`);
targeted.csv one row per (attack, defense, seed, target); summary.csv one row per
(attack, defense) with 95% Wilson intervals for the attack and for the control.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from experiments import common
from jaxshape import results

MAX_RAD = 0.05  # §6.1: a targeted attack counts only while RAD < 0.05 (Suciu et al.)

TARGETED_COLUMNS = (
  "target_index",
  "attack",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "success",
  "success_epoch",
  "attempts_used",
  "n_poisons_used",
  "initial_margin",
  "control_success",
  "control_margin_final",
  "margin_shift_first",
  "margin_shift_best",
  "margin_shifts",
  "clean_acc",
  "acc_final",
  "rad",
)
SUMMARY_COLUMNS = (
  "label",
  "attack",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "n",
  "successes",
  "success_rate",
  "ci_low",
  "ci_high",
  "control_successes",
  "control_rate",
  "control_ci_low",
  "control_ci_high",
  "net_successes",
  "net_rate",
  "mean_attempts",
  "mean_poisons",
  "std_poisons",
  "mean_rad",
  "initial_margin",
  "margin_shift_first",
  "margin_shift_best",
  "flip_rate",
  "clean_acc",
  "control_acc",
  "utility_rad",
)


def decide_success(
  pred_E: Sequence[int],
  acc_E: Sequence[float],
  attacker_class: int,
  clean_acc: float,
  max_rad: float = MAX_RAD,
) -> tuple[bool, int | None]:
  """The §6.1 rule: the target is the attacker's class at the end of *any* epoch, RAD < max_rad.

  Args:
    pred_E: the target's predicted class after each re-training epoch.
    acc_E: test accuracy after each epoch.
    attacker_class: the class the attacker wants for the target.
    clean_acc: test accuracy of the clean pre-trained model (RAD's reference).
    max_rad: the RAD bound (0.05; strict).

  Returns:
    `(success, epoch)`: the first epoch (1-based) where both hold, or None.

  Example:
    >>> decide_success([4, 3, 3], [0.85, 0.70, 0.84], 3, 0.85)
    (True, 3)
  """
  pred_E = np.asarray(pred_E)
  acc_E = np.asarray(acc_E, np.float64)
  if pred_E.shape != acc_E.shape or pred_E.ndim != 1:
    raise ValueError(f"pred_E {pred_E.shape} and acc_E {acc_E.shape} must be equal 1-D")
  if not clean_acc > 0:
    raise ValueError(f"clean_acc must be > 0, got {clean_acc}")
  ok_E = (pred_E == attacker_class) & ((clean_acc - acc_E) / clean_acc < max_rad)
  if not ok_E.any():
    return False, None
  return True, int(np.argmax(ok_E)) + 1


def first_flip(pred_E: Sequence[int], attacker_class: int) -> int | None:
  """First epoch (1-based) the target is the attacker's class, whatever the accuracy."""
  hit_E = np.asarray(pred_E) == attacker_class
  return int(np.argmax(hit_E)) + 1 if hit_E.any() else None


def _ident(row) -> tuple:
  d = common.Defense.from_row(row)
  return (d.kind, results.canonical(d.clip_norm), results.canonical(d.noise_multiplier))


def aggregate(
  plan,
  attempt_rows: list[dict],
  mode: str,
  control: str = "control",
  attempts: int | None = None,
  counts: Sequence[int] | None = None,
) -> list[dict]:
  """targeted.csv rows: one per (attack, arm, seed, target) of `plan`.

  The runs of a target are taken in the original's order (one-shot: attempts 0, 1, ...;
  multi-poison: poison counts ascending) and stop at the first success: runs after it are
  masked (they were computed in the same vmapped program, but a sequential run would not
  have made them). The reported run is the first success, else the last run.
  `margin_shifts` lists, per kept run, its final margin minus the control's (the same
  re-training without the poison): negative is toward the attacker. A target with no
  usable poison fails with no run (acc_final and rad empty). Rows of an earlier run with more
  `attempts` (one-shot) or other `counts` (multi-poison) in the same attempts.csv are left
  out, so a run with fewer attempts reports any-of-its-own-attempts.
  """
  runs: dict[tuple, list[dict]] = {}
  controls: dict[tuple, dict] = {}
  for row in attempt_rows:
    ident = (_ident(row), int(row["seed"]), int(row["target_index"]))
    if row["attack"] == control:
      controls[ident] = row
    elif attempts is not None and mode == "oneshot" and int(row["attempt"]) >= attempts:
      continue
    elif counts is not None and mode == "multipoison" and int(row["n_poisons"]) not in counts:
      continue
    else:
      runs.setdefault((row["attack"], *ident), []).append(row)
  attacks = list(dict.fromkeys(a for a, _ in plan.crafted))
  out = []
  for attack in attacks:
    for arm in plan.arms:
      for seed in plan.seeds:
        m = plan.model_index(arm, seed)
        for i, target in enumerate(plan.targets(m)):
          ident = (_ident(arm.key.fields()), seed, int(target))
          ctrl = controls.get(ident)
          order = "attempt" if mode == "oneshot" else "n_poisons"
          mine = sorted(runs.get((attack, *ident), []), key=lambda r: int(r[order]))
          # Stop at the first success (the original's order): later runs are masked.
          first = next((j for j, r in enumerate(mine) if r["success"] is True), None)
          mine = mine if first is None else mine[: first + 1]
          pick = mine[-1] if mine else None
          shifts = [
            r["margin_final"] - ctrl["margin_final"]
            for r in mine
            if ctrl is not None and r["margin_final"] is not None
          ]
          success = pick is not None and pick["success"] is True
          out.append(
            {
              "target_index": int(target),
              "attack": attack,
              **arm.key.fields(),
              "seed": seed,
              "success": success,
              "success_epoch": pick["success_epoch"] if pick else None,
              "attempts_used": mine.index(pick) + 1 if pick else 0,
              "n_poisons_used": int(pick["n_poisons"]) if pick else 0,
              "initial_margin": float(plan.margin_MT[m][i]),
              "control_success": None if ctrl is None else ctrl["success"] is True,
              "control_margin_final": None if ctrl is None else ctrl["margin_final"],
              "margin_shift_first": shifts[0] if shifts else None,
              "margin_shift_best": min(shifts) if shifts else None,
              "margin_shifts": ";".join(f"{s:.3f}" for s in shifts),
              "clean_acc": plan.clean_acc_M[m],
              "acc_final": pick["acc_final"] if pick else None,
              "rad": pick["rad"] if pick else None,
              "_flip": any(r["flip_epoch"] is not None for r in mine),
              "_control_acc": None if ctrl is None else ctrl["acc_final"],
            }
          )
  return out


def _mean(values) -> float:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else math.nan


def summarize(plan, targeted: list[dict]) -> list[dict]:
  """One row per (attack, defense): success with its Wilson interval, the no-poison
  control's rate and interval, successes on targets the control did not flip (`net`),
  attempts and poisons needed, RAD, margins, and the defense's clean utility cost (its
  control's accuracy vs vanilla's)."""
  vanilla = [r["_control_acc"] for r in targeted if r["defense"] == "vanilla"]
  v_acc = _mean(vanilla)
  out = []
  for attack in dict.fromkeys(r["attack"] for r in targeted):
    for arm in plan.arms:
      d = arm.key
      rows = [r for r in targeted if r["attack"] == attack and d.matches(r)]
      n, wins = len(rows), sum(r["success"] for r in rows)
      c_wins = sum(bool(r["control_success"]) for r in rows)
      net = sum(r["success"] and not r["control_success"] for r in rows)
      low, high = results.wilson_interval(wins, n)
      c_low, c_high = results.wilson_interval(c_wins, n)
      needed = np.asarray([r["n_poisons_used"] for r in rows if r["success"]], np.float64)
      c_acc = _mean(r["_control_acc"] for r in rows)
      out.append(
        {
          "label": d.label,
          "attack": attack,
          **d.fields(),
          "n": n,
          "successes": wins,
          "success_rate": wins / n if n else math.nan,
          "ci_low": low,
          "ci_high": high,
          "control_successes": c_wins,
          "control_rate": c_wins / n if n else math.nan,
          "control_ci_low": c_low,
          "control_ci_high": c_high,
          "net_successes": net,
          "net_rate": net / n if n else math.nan,
          "mean_attempts": _mean(r["attempts_used"] for r in rows if r["success"]),
          "mean_poisons": float(needed.mean()) if needed.size else math.nan,
          "std_poisons": float(needed.std(ddof=1)) if needed.size > 1 else math.nan,
          "mean_rad": _mean(r["rad"] for r in rows),
          "initial_margin": _mean(r["initial_margin"] for r in rows),
          "margin_shift_first": _mean(r["margin_shift_first"] for r in rows),
          "margin_shift_best": _mean(r["margin_shift_best"] for r in rows),
          "flip_rate": sum(r["_flip"] for r in rows) / n if n else math.nan,
          "clean_acc": _mean(r["clean_acc"] for r in rows),
          "control_acc": c_acc,
          "utility_rad": (v_acc - c_acc) / v_acc if vanilla else math.nan,
        }
      )
  return out
