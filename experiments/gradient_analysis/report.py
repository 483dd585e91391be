"""The summary table and gradients.png (ratio and cosine vs epoch; Fig. 1, Fig. 4c/4f)."""

from __future__ import annotations

import math

import numpy as np

from experiments import common
from experiments.gradient_analysis.config import COLUMNS
from experiments.gradient_analysis.config import SCENARIO_SPECS
from experiments.gradient_analysis.config import Config
from experiments.gradient_analysis.config import defense_grid
from experiments.gradient_analysis.config import settings
from jaxshape import results


def selected(rows: list[dict], config: Config) -> list[dict]:
  wanted = set()
  for scenario in config.scenarios:
    for defense, clip, sigma, _ in defense_grid(config, scenario):
      for setting in settings(config, scenario):
        for seed in range(config.seeds):
          wanted.add(tuple(map(results.canonical, (scenario, setting, defense, clip, sigma, seed))))
  return [r for r in rows if tuple(results.canonical(r[c]) for c in COLUMNS[:6]) in wanted]


_GROUP = ("scenario", "setting", "defense", "clip_norm", "noise_multiplier")


def summarize(rows: list[dict]) -> list[dict]:
  """Per scenario x setting x defense: mean over epochs, then mean +- std over seeds.

  Columns: ratio and cosine for both layer views, the final test accuracy,
  and the number of seeds.
  """
  per_seed: dict[tuple, dict[str, list[float]]] = {}
  final: dict[tuple, tuple[int, float]] = {}
  for r in rows:
    job = tuple(r[c] for c in (*_GROUP, "seed"))
    cell = per_seed.setdefault(job, {})
    for name in ("ratio", "cosine"):
      cell.setdefault(f"{name}_{r['layer']}", []).append(float(r[name]))
    if job not in final or r["epoch"] > final[job][0]:
      final[job] = (r["epoch"], float(r["test_acc"]))
  seed_rows = []
  for job, cell in per_seed.items():
    row = dict(zip((*_GROUP, "seed"), job, strict=True))
    row.update(
      {k: float(np.nanmean(v)) if np.any(np.isfinite(v)) else math.nan for k, v in cell.items()}
    )
    row["test_acc"] = final[job][1]
    seed_rows.append(row)
  out = []
  for value in ("ratio_all", "cosine_all", "ratio_last", "cosine_last", "test_acc"):
    stats = results.mean_std(seed_rows, by=_GROUP, value=value)
    for i, s in enumerate(stats):
      if len(out) <= i:
        out.append({k: s[k] for k in _GROUP} | {"seeds": s["n"]})
      out[i][value] = s["mean"]
      out[i][f"{value}_std"] = s["std"]
  return out


def format_summary(summary: list[dict]) -> str:
  def pm(row, value):
    return f"{row[value]:.3f} +- {row[value + '_std']:.3f}"

  table = [
    {
      "scenario": s["scenario"],
      "setting": s["setting"],
      "defense": s["defense"],
      "C": s["clip_norm"],
      "sigma": s["noise_multiplier"],
      "ratio (all)": pm(s, "ratio_all"),
      "cosine (all)": pm(s, "cosine_all"),
      "ratio (last)": pm(s, "ratio_last"),
      "cosine (last)": pm(s, "cosine_last"),
      "test acc": s["test_acc"],
      "seeds": s["seeds"],
    }
    for s in summary
  ]
  return results.format_table(table, list(table[0].keys())) if table else "(no rows)"


def _defense_label(defense, clip, sigma) -> str:
  return common.Defense(defense, float(clip), float(sigma)).label


def plot(path: str, rows: list[dict], config: Config) -> None:
  """Ratio (log) and cosine vs epoch: one column per scenario, rows (ratio, cosine) x layer."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  scenarios = [s for s in config.scenarios if any(r["scenario"] == s for r in rows)]
  if not scenarios:
    return
  panels = [("ratio", "all"), ("cosine", "all"), ("ratio", "last"), ("cosine", "last")]
  fig = Figure(figsize=(4.6 * len(scenarios), 3.2 * len(panels)), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(panels), len(scenarios), squeeze=False)
  styles = ("-", "--", ":", "-.")
  for j, scenario in enumerate(scenarios):
    mine = [r for r in rows if r["scenario"] == scenario]
    setting_list = settings(config, scenario)
    grid = defense_grid(config, scenario)
    colors = _colors(len(setting_list))
    for i, (value, layer) in enumerate(panels):
      ax = axes[i, j]
      for si, setting in enumerate(setting_list):
        for di, (defense, clip, sigma, _) in enumerate(grid):
          sel = [
            r
            for r in mine
            if r["layer"] == layer
            and results.canonical(r["setting"]) == results.canonical(setting)
            and r["defense"] == defense
            and results.canonical(r["clip_norm"]) == results.canonical(clip)
            and results.canonical(r["noise_multiplier"]) == results.canonical(sigma)
          ]
          if not sel:
            continue
          stats = results.mean_std(sel, by=("epoch",), value=value)
          x = np.array([s["epoch"] for s in stats], np.float64)
          y = np.array([s["mean"] for s in stats], np.float64)
          e = np.array([s["std"] for s in stats], np.float64)
          label = f"{SCENARIO_SPECS[scenario].setting_name}={setting:g}, " + _defense_label(
            defense, clip, sigma
          )
          ax.plot(x, y, styles[di % len(styles)], color=colors[si], label=label, linewidth=1.2)
          lo, hi = y - e, y + e
          if value == "ratio":
            lo = np.maximum(lo, y * 0.05)
          ax.fill_between(x, lo, hi, color=colors[si], alpha=0.12, linewidth=0)
      if value == "ratio":
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_ylabel(f"||g_poison|| / ||g_clean|| ({layer})")
      else:
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel(f"cos(g_clean, g_poison) ({layer})")
      ax.set_xlabel("epoch")
      ax.grid(True, alpha=0.3)
      if i == 0:
        ax.set_title(scenario)
        ax.legend(fontsize=6, frameon=False, ncol=1 + len(setting_list) * len(grid) // 8)
  results.save_figure(fig, path, dpi=110)


def _colors(n: int):
  from matplotlib import colormaps

  cmap = colormaps["viridis"]
  return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]
