"""adaptive.png: success rate and poisons needed vs utility cost, fixed vs adaptive noise."""

from __future__ import annotations

import numpy as np

from experiments.adaptive_noise.answer import frontier
from jaxshape import results


def plot(path: str, rows: list[dict]) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11.0, 4.4), layout="constrained")
  FigureCanvasAgg(fig)
  ax_rate, ax_poisons = fig.subplots(1, 2)
  styles = {"fixed": ("tab:blue", "o-"), "adaptive": ("tab:orange", "s-")}
  for name, (color, fmt) in styles.items():
    pts = frontier(rows, name)
    x = np.asarray([r["utility_rad"] for r in pts])
    xerr = np.asarray([r["utility_rad_std"] for r in pts])
    y = np.asarray([r["success_rate"] for r in pts])
    yerr = np.stack(
      [y - np.asarray([r["ci_low"] for r in pts]), np.asarray([r["ci_high"] for r in pts]) - y]
    )
    ax_rate.errorbar(
      x, y, xerr=xerr, yerr=yerr, fmt=fmt, color=color, capsize=3, label=f"{name} noise (C=4)"
    )
    for r in pts:
      ax_rate.annotate(
        f"s={r['noise_multiplier']:g}",
        (r["utility_rad"], r["success_rate"]),
        textcoords="offset points",
        xytext=(4, 4),
        fontsize=7,
        color=color,
      )
    needed = np.asarray([r["mean_poisons"] for r in pts], np.float64)
    spread = np.nan_to_num(np.asarray([r["std_poisons"] for r in pts], np.float64))
    ax_poisons.errorbar(
      x, needed, yerr=spread, fmt=fmt, color=color, capsize=3, label=f"{name} noise (C=4)"
    )
  v = next(r for r in rows if r["mechanism"] == "vanilla")
  ax_rate.errorbar(
    [0.0],
    [v["success_rate"]],
    yerr=[[v["success_rate"] - v["ci_low"]], [v["ci_high"] - v["success_rate"]]],
    fmt="k*",
    markersize=10,
    capsize=3,
    label="vanilla",
  )
  ax_poisons.plot([0.0], [v["mean_poisons"]], "k*", markersize=10, label="vanilla")
  ax_rate.set_ylim(-0.02, 1.02)
  ax_rate.set_xlabel("utility cost: clean RAD vs vanilla")
  ax_rate.set_ylabel("multi-poison success rate (95% Wilson)")
  ax_rate.set_title("success vs utility cost (frontiers from clip-only s=0)")
  ax_poisons.set_xlabel("utility cost: clean RAD vs vanilla")
  ax_poisons.set_ylabel("poisons needed (successful targets)")
  ax_poisons.set_title("poisons needed vs utility cost")
  for ax in (ax_rate, ax_poisons):
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
  results.save_figure(fig, path, dpi=120)
