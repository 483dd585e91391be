"""Printed tables and figures of the targeted experiment."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxshape import results

CLASS_NAMES = {  # FashionMNIST
  0: "T-shirt",
  1: "trouser",
  2: "pullover",
  3: "dress",
  4: "coat",
  5: "sandal",
  6: "shirt",
  7: "sneaker",
  8: "bag",
  9: "boot",
}


def format_margins(rows: list[dict], chosen: tuple[int, int], top: int = 8) -> str:
  """The `top` most confusable class pairs and the chosen one (margins in logits)."""
  shown = rows[:top] + [r for r in rows[top:] if (r["target_class"], r["base_class"]) == chosen]
  table = [
    {
      "pair": f"{r['target_class']} -> {r['base_class']}"
      + (" (chosen)" if (r["target_class"], r["base_class"]) == chosen else ""),
      "names": f"{CLASS_NAMES.get(r['target_class'])} -> {CLASS_NAMES.get(r['base_class'])}",
      "correct": r["n_correct"],
      "median margin": r["median_margin"],
      "10% quantile": r["q10_margin"],
      "share < 2": r["frac_under_2"],
    }
    for r in shown
  ]
  return results.format_table(table, list(table[0]))


def format_summary(summary: list[dict], mode: str) -> str:
  table = []
  for s in summary:
    row = {
      "attack": s["attack"],
      "defense": s["label"],
      "success [95% CI]": f"{s['successes']}/{s['n']} = {s['success_rate']:.2f} "
      f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]",
      "control [95% CI]": f"{s['control_successes']}/{s['n']} "
      f"[{s['control_ci_low']:.2f}, {s['control_ci_high']:.2f}]",
      "net": s["net_successes"],
      "attempts": s["mean_attempts"],
      "mean RAD": s["mean_rad"],
      "init margin": s["initial_margin"],
      "shift 1st": s["margin_shift_first"],
      "shift best": s["margin_shift_best"],
      "clean acc": s["clean_acc"],
      "utility RAD": s["utility_rad"],
    }
    if mode == "multipoison":
      row["poisons needed"] = s["mean_poisons"]
    table.append(row)
  return results.format_table(table, list(table[0].keys()))


def plot_summary(path: str, panels: Sequence[tuple[str, list[dict]]], multipoison: bool) -> None:
  """Per panel: success rate per defense (one marker series per attack) with Wilson 95%
  error bars and the no-poison control; multi-poison also the mean poisons needed."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows_n = 2 if multipoison else 1
  n_def = max(len({s["label"] for s in summary}) for _, summary in panels)
  width = max(5.0, 1.1 * n_def + 2.5)
  fig = Figure(figsize=(width * len(panels), 3.8 * rows_n + 0.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows_n, len(panels), squeeze=False)
  for j, (title, summary) in enumerate(panels):
    labels = list(dict.fromkeys(s["label"] for s in summary))
    attacks = list(dict.fromkeys(s["attack"] for s in summary))
    x_D = np.arange(len(labels))
    ax = axes[0, j]
    for a, attack in enumerate(attacks):
      rows = {s["label"]: s for s in summary if s["attack"] == attack}
      rate = np.asarray([rows[lb]["success_rate"] for lb in labels])
      err = np.stack(
        [
          rate - np.asarray([rows[lb]["ci_low"] for lb in labels]),
          np.asarray([rows[lb]["ci_high"] for lb in labels]) - rate,
        ]
      )
      offset = (a - (len(attacks) - 1) / 2) * 0.15
      ax.errorbar(x_D + offset, rate, yerr=err, capsize=3, label=attack, **results.style(a, 4))
    control = {s["label"]: s for s in summary}
    ax.plot(
      x_D,
      [control[lb]["control_rate"] for lb in labels],
      "o",
      mfc="none",
      mec="k",
      ms=9,
      label="no-poison control",
    )
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("success rate (RAD < 0.05)")
    ax.set_title(title)
    ax.set_xticks(x_D, labels, rotation=30, ha="right")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    if multipoison:
      ax = axes[1, j]
      for a, attack in enumerate(attacks):
        rows = {s["label"]: s for s in summary if s["attack"] == attack}
        mean = np.asarray([rows[lb]["mean_poisons"] for lb in labels], np.float64)
        std = np.nan_to_num(np.asarray([rows[lb]["std_poisons"] for lb in labels], np.float64))
        offset = (a - (len(attacks) - 1) / 2) * 0.15
        ax.errorbar(x_D + offset, mean, yerr=std, capsize=3, label=attack, **results.style(a, 4))
      ax.set_ylabel("poisons needed (successful targets)")
      ax.set_xticks(x_D, labels, rotation=30, ha="right")
      ax.grid(True, axis="y", alpha=0.3)
      ax.legend(frameon=False, fontsize=8)
  results.save_figure(fig, path, dpi=120)
