"""From results.csv rows to the summary, the best points under a cost budget, and Pareto plots.

  summarize     one row per (attack, ratio, mechanism point): the attack metric over seeds
                (RAD: mean and std; multi-poison: hits pooled over seeds with a 95% Wilson
                interval), the clean-accuracy cost (points) and the detector's AUCs.
  best_points   per (attack, ratio, mechanism), the point with the lowest metric among
                those whose mean cost is at most each budget (1 and 2 points).
  plot_pareto   per attack, metric vs cost, one curve per mechanism over its
                hyperparameter, a panel per ratio.

References:
  Hong et al. 2020, §7 (a defense must bound magnitudes and orientations).
"""

from __future__ import annotations

import math

import numpy as np

from experiments.shaping.config import AUC_COLUMNS
from experiments.shaping.config import MECHANISM_FIELDS
from experiments.shaping.config import MECHANISMS
from experiments.shaping.config import mechanism_ident
from jaxshape import results

SUMMARY_COLUMNS = (
  "attack",
  "poison_ratio",
  "n_poisons",
  *MECHANISM_FIELDS,
  "label",
  "seeds",
  "metric_name",
  "metric",
  "metric_std",
  "ci_low",
  "ci_high",
  "cost",
  "cost_std",
  "clean_acc",
  "acc",
  "successes",
  "targets",
  "control_successes",
  "n_removed",
  "n_poison_removed",
  *AUC_COLUMNS,
)
BUDGETS = (1.0, 2.0)  # clean-accuracy cost budgets of the best-point table, in points
BEST_COLUMNS = (
  "budget",
  "attack",
  "poison_ratio",
  "mechanism",
  "label",
  "metric",
  "ci_low",
  "ci_high",
  "metric_std",
  "cost",
  "cost_std",
  "vanilla_metric",
)


def _mean(values) -> float:
  vals = [float(v) for v in values if v is not None and v != "" and not _nan(v)]
  return float(np.mean(vals)) if vals else math.nan


def _std(values) -> float:
  vals = [float(v) for v in values if v is not None and v != "" and not _nan(v)]
  return float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else math.nan)


def _nan(v) -> bool:
  return isinstance(v, float) and math.isnan(v)


def summarize(rows: list[dict]) -> list[dict]:
  """summary.csv rows, in the order of attacks, ratios and `MECHANISMS`."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["attack"], results.canonical(r["poison_ratio"]), mechanism_ident(r)), [])
    groups[r["attack"], results.canonical(r["poison_ratio"]), mechanism_ident(r)].append(r)
  out = []
  for group in groups.values():
    first = group[0]
    row = {k: first[k] for k in ("attack", "poison_ratio", "n_poisons", *MECHANISM_FIELDS)}
    row.update(label=first["label"], seeds=len(group), metric_name=first["metric_name"])
    metric = [r["metric"] for r in group]
    row.update(metric=_mean(metric), metric_std=_std(metric))
    if first["metric_name"] == "success":
      wins = sum(int(r["successes"]) for r in group)
      n = sum(int(r["targets"]) for r in group)
      row.update(successes=wins, targets=n, metric=wins / n if n else math.nan)
      row["control_successes"] = sum(int(r["control_successes"]) for r in group)
      row["ci_low"], row["ci_high"] = results.wilson_interval(wins, n)
    for k in ("cost", "clean_acc"):
      row[k] = _mean(r[k] for r in group)
    row["cost_std"] = _std(r["cost"] for r in group)
    for k in ("acc", "n_removed", "n_poison_removed", *AUC_COLUMNS):
      row[k] = _mean(r.get(k) for r in group)
    out.append(row)
  rank = {m: i for i, m in enumerate(MECHANISMS)}
  return sorted(
    out,
    key=lambda r: (
      r["attack"],
      float(r["poison_ratio"]),
      rank.get(r["mechanism"], len(rank)),
      float(r["hyperparameter"]) if not _nan(float(r["hyperparameter"])) else 0.0,
    ),
  )


def best_points(summary: list[dict], budgets=BUDGETS) -> list[dict]:
  """Per budget, (attack, ratio, mechanism): its lowest-metric point with mean cost <= budget
  (ties: the cheaper); mechanisms with no such point are listed with an empty metric."""
  out = []
  vanilla = {
    (r["attack"], r["poison_ratio"]): r["metric"] for r in summary if r["mechanism"] == "vanilla"
  }
  for budget in budgets:
    groups: dict[tuple, list[dict]] = {}
    for r in summary:
      groups.setdefault((r["attack"], r["poison_ratio"], r["mechanism"]), []).append(r)
    for (attack, ratio, mech), pts in groups.items():
      ok = [p for p in pts if p["cost"] <= budget]
      best = min(ok, key=lambda p: (p["metric"], p["cost"])) if ok else None
      cheapest = min(pts, key=lambda p: p["cost"])
      pick = best or cheapest
      out.append(
        {
          "budget": budget,
          "attack": attack,
          "poison_ratio": ratio,
          "mechanism": mech,
          "label": pick["label"] + ("" if best else " (over budget; cheapest point)"),
          "metric": pick["metric"] if best else math.nan,
          "ci_low": pick.get("ci_low"),
          "ci_high": pick.get("ci_high"),
          "metric_std": pick["metric_std"],
          "cost": pick["cost"],
          "cost_std": pick["cost_std"],
          "vanilla_metric": vanilla.get((attack, ratio), math.nan),
        }
      )
  return out


def _metric_text(r) -> str:
  if _nan(float(r["metric"])):
    return "-"
  if r.get("ci_low") not in (None, "") and not _nan(float(r["ci_low"])):
    return f"{r['metric']:.2f} [{float(r['ci_low']):.2f}, {float(r['ci_high']):.2f}]"
  return f"{r['metric']:.3f} ± {r['metric_std']:.3f}"


def table(summary: list[dict]) -> str:
  """The printed summary: per (attack, ratio), one line per mechanism point."""
  parts = []
  key = None
  for r in summary:
    if (r["attack"], r["poison_ratio"]) != key:
      key = (r["attack"], r["poison_ratio"])
      what = "success [95% Wilson]" if r["metric_name"] == "success" else "RAD best ± std"
      parts.append(f"\n{r['attack']} at {float(r['poison_ratio']):.4g} ({what}; cost in points)")
      parts.append(f"  {'mechanism':<24} {'metric':>22} {'cost':>14} {'clean acc':>9} {'AUC':>6}")
    auc = r.get("auc_" + "norm")
    auc_text = "" if auc is None or _nan(float(auc)) else f"{float(auc):.3f}"
    parts.append(
      f"  {r['label']:<24} {_metric_text(r):>22} "
      f"{r['cost']:>7.2f} ± {r['cost_std']:<4.2f} {r['clean_acc']:>9.4f} {auc_text:>6}"
    )
  return "\n".join(parts)


def best_table(best: list[dict]) -> str:
  lines = []
  key = None
  for r in best:
    if (r["budget"], r["attack"], r["poison_ratio"]) != key:
      key = (r["budget"], r["attack"], r["poison_ratio"])
      lines.append(
        f"\nbest point at cost <= {r['budget']:g} point(s): {r['attack']} at "
        f"{float(r['poison_ratio']):.4g} (vanilla {float(r['vanilla_metric']):.3f})"
      )
    lines.append(
      f"  {r['mechanism']:<9} {r['label']:<48} {_metric_text(r):>22} cost {r['cost']:.2f}"
    )
  return "\n".join(lines)


def plot_pareto(path: str, summary: list[dict], attack: str, max_cost: float = 10.0) -> None:
  """Metric vs clean-accuracy cost for one attack, a panel per ratio, a curve per mechanism
  over its hyperparameter; the cost budgets as dotted lines; points costing more than
  `max_cost` points are left off the axes and named in the legend."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  ratios = sorted({float(r["poison_ratio"]) for r in summary if r["attack"] == attack})
  fig = Figure(figsize=(5.5 * len(ratios), 4.4), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(ratios), squeeze=False)[0]
  for ax, ratio in zip(axes, ratios, strict=True):
    pts = [r for r in summary if r["attack"] == attack and float(r["poison_ratio"]) == ratio]
    for i, mech in enumerate(m for m in MECHANISMS if any(r["mechanism"] == m for r in pts)):
      mine = [r for r in pts if r["mechanism"] == mech]
      mine.sort(key=lambda r: 0.0 if _nan(float(r["hyperparameter"])) else r["hyperparameter"])
      shown = [r for r in mine if r["cost"] <= max_cost]
      label = mech + (
        f" ({len(mine) - len(shown)} pt(s) cost > {max_cost:g})" if len(shown) < len(mine) else ""
      )
      if not shown:
        ax.plot([], [], label=label, **results.style(i, len(MECHANISMS)))
        continue
      y = np.array([r["metric"] for r in shown], np.float64)
      if shown[0]["metric_name"] == "success":
        err = np.array(
          [[r["metric"] - r["ci_low"] for r in shown], [r["ci_high"] - r["metric"] for r in shown]],
          np.float64,
        )
      else:
        err = np.array([r["metric_std"] for r in shown], np.float64)
      ax.errorbar(
        [r["cost"] for r in shown],
        y,
        yerr=err,
        xerr=[r["cost_std"] for r in shown],
        label=label,
        markersize=4,
        capsize=2,
        **results.style(i, len(MECHANISMS)),
      )
    for budget in BUDGETS:
      ax.axvline(budget, color="0.6", linestyle=":", linewidth=1)
    name = pts[0]["metric_name"] if pts else "metric"
    ax.set_ylabel("RAD (best epoch)" if name != "success" else "success (95% Wilson)")
    ax.set_xlabel("clean-accuracy cost (points vs vanilla)")
    ax.set_title(f"{attack} at {ratio:.4g}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
  results.save_figure(fig, path, dpi=130)
