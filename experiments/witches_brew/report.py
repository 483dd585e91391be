"""Summary of a Witches' Brew run: success and control rates with Wilson intervals, a plot.

One summary row per defense over its target x seed rows: poisoned victims'
success rate and 95% Wilson interval, the same for the no-poison controls
(same victim keys, evaluated on the same targets), mean alignment (on the
surrogates while crafting and at the poisoned victim's final parameters),
mean shift of the adversarial margin against the control, and clean accuracy.
"""

from __future__ import annotations

import os

import numpy as np

from jaxshape import results

SUMMARY_COLUMNS = (
  "defense",
  "clip_norm",
  "noise_multiplier",
  "n",
  "successes",
  "success_rate",
  "success_low",
  "success_high",
  "control_successes",
  "control_rate",
  "control_low",
  "control_high",
  "alignment",
  "alignment_victim",
  "base_alignment_victim",
  "margin_shift",
  "clean_acc",
  "control_clean_acc",
  "epsilon",
)


def summarise(rows) -> list[dict]:
  """One row per defense (in first-seen order) of the parsed result rows."""
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault((r["defense"], r["clip_norm"], r["noise_multiplier"]), []).append(r)
  out = []
  for (defense, clip, sigma), rs in groups.items():
    n = len(rs)
    wins = int(sum(int(r["success"]) for r in rs))
    ctrl = int(sum(int(r["control_success"]) for r in rs))
    mean = lambda f, rs=rs: float(np.mean([float(r[f]) for r in rs]))
    out.append({
      "defense": defense, "clip_norm": clip, "noise_multiplier": sigma, "n": n,
      "successes": wins, "success_rate": wins / n,
      "success_low": results.wilson_interval(wins, n)[0],
      "success_high": results.wilson_interval(wins, n)[1],
      "control_successes": ctrl, "control_rate": ctrl / n,
      "control_low": results.wilson_interval(ctrl, n)[0],
      "control_high": results.wilson_interval(ctrl, n)[1],
      "alignment": mean("alignment"), "alignment_victim": mean("alignment_victim"),
      "base_alignment_victim": mean("base_alignment_victim"),
      "margin_shift": float(np.mean([r["adv_margin"] - r["control_adv_margin"] for r in rs])),
      "clean_acc": mean("clean_acc"), "control_clean_acc": mean("control_clean_acc"),
      "epsilon": float(rs[0]["epsilon"]),
    })  # fmt: skip
  return out


def _label(row) -> str:
  if row["defense"] == "vanilla":
    return "vanilla"
  return f"C={row['clip_norm']:g} s={row['noise_multiplier']:g}"


def plot(path: str, summary: list[dict]) -> None:
  """Success and control rate (Wilson 95% intervals) against clean accuracy, per defense."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.0, 4.0), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for i, row in enumerate(summary):
    for kind, marker, fill in (("success", "o", None), ("control", "s", "none")):
      rate = row[f"{kind}_rate"]
      low, high = row[f"{kind}_low"], row[f"{kind}_high"]
      acc = row["clean_acc"] if kind == "success" else row["control_clean_acc"]
      ax.errorbar(
        [acc], [rate], yerr=[[rate - low], [high - rate]], color=f"C{i % 10}", marker=marker,
        mfc=fill, capsize=3, linestyle="none",
        label=f"{_label(row)} ({'poisoned' if kind == 'success' else 'control'})",
      )  # fmt: skip
  ax.set_xlabel("clean test accuracy")
  ax.set_ylabel("target classified as the adversarial class")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title("Witches' Brew, victims from scratch (95% Wilson)")
  ax.grid(True, alpha=0.3)
  ax.legend(frameon=False, fontsize=7)
  results.save_figure(fig, path)


def write(config, rows, brews: dict) -> list[dict]:
  """summary.csv, summary.png and a printed table in `config.out`; returns the summary."""
  summary = summarise(rows)
  results.write_csv(os.path.join(config.out, "summary.csv"), summary, SUMMARY_COLUMNS)
  if summary:
    plot(os.path.join(config.out, "summary.png"), summary)
  seconds = [float(b["seconds"]) for b in brews.values()]
  table = [{**r, "defense": _label(r)} for r in summary]
  print(results.format_table(table, ["defense", "n", "success_rate", "success_low",
        "success_high", "control_rate", "control_high", "alignment", "alignment_victim",
        "base_alignment_victim", "margin_shift", "clean_acc", "epsilon"]))  # fmt: skip
  if seconds:
    print(f"crafting: {len(seconds)} targets, {sum(seconds):.0f} s (mean {np.mean(seconds):.1f} s)")
  return summary
