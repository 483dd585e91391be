"""Summary of a backdoor run: ASR and control ASR (mean ± std over seeds, pooled Wilson
intervals), clean and target-class accuracy, clean train loss; two plots.

One summary row per (attack, protocol, poison_ratio, defense). The Wilson interval pools
the triggered test points of every seed (successes = round(asr x n_triggered)).
"""

from __future__ import annotations

import os

import numpy as np

from jaxshape import results

GROUP = ("attack", "protocol", "poison_ratio", "defense", "clip_norm", "noise_multiplier")
SUMMARY_COLUMNS = (
  *GROUP,
  "n_poisons",
  "seeds",
  "asr",
  "asr_std",
  "asr_low",
  "asr_high",
  "control_asr",
  "control_asr_std",
  "control_low",
  "control_high",
  "clean_acc",
  "clean_acc_std",
  "control_clean_acc",
  "target_class_acc",
  "clean_train_loss",
  "epsilon",
)


def _wilson(rs, field):
  wins = int(sum(round(r[field] * r["n_triggered"]) for r in rs))
  return results.wilson_interval(wins, int(sum(r["n_triggered"] for r in rs)))


def summarise(rows) -> list[dict]:
  """One row per configuration (first-seen order) of the parsed result rows."""
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault(tuple(r[g] for g in GROUP), []).append(r)
  out = []
  for key, rs in groups.items():
    mean = lambda f, rs=rs: float(np.mean([float(r[f]) for r in rs]))
    std = lambda f, rs=rs: float(np.std([float(r[f]) for r in rs]))
    out.append({
      **dict(zip(GROUP, key, strict=True)), "n_poisons": rs[0]["n_poisons"], "seeds": len(rs),
      "asr": mean("asr"), "asr_std": std("asr"),
      "asr_low": _wilson(rs, "asr")[0], "asr_high": _wilson(rs, "asr")[1],
      "control_asr": mean("control_asr"), "control_asr_std": std("control_asr"),
      "control_low": _wilson(rs, "control_asr")[0], "control_high": _wilson(rs, "control_asr")[1],
      "clean_acc": mean("clean_acc"), "clean_acc_std": std("clean_acc"),
      "control_clean_acc": mean("control_clean_acc"),
      "target_class_acc": mean("target_class_acc"),
      "clean_train_loss": mean("clean_train_loss"), "epsilon": float(rs[0]["epsilon"]),
    })  # fmt: skip
  return out


def _label(row) -> str:
  if row["defense"] == "vanilla":
    return "vanilla"
  return f"C={row['clip_norm']:g} s={row['noise_multiplier']:g}"


def _figure(ncols: int):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(4.2 * ncols, 3.6), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_ratio(path: str, summary: list[dict]) -> None:
  """ASR (filled) and control ASR (open) vs poison ratio, one panel per attack, line per defense."""
  names = list(dict.fromkeys(r["attack"] for r in summary))
  fig, axes = _figure(len(names))
  for ax, name in zip(axes, names, strict=True):
    rs = [r for r in summary if r["attack"] == name]
    for i, label in enumerate(dict.fromkeys(_label(r) for r in rs)):
      line = sorted((r for r in rs if _label(r) == label), key=lambda r: r["poison_ratio"])
      x = [100 * r["poison_ratio"] for r in line]
      for f, lo, hi, mfc, ls in (("asr", "asr_low", "asr_high", None, "-"),
                                 ("control_asr", "control_low", "control_high", "none", ":")):
        y = np.array([r[f] for r in line])
        err = [y - [r[lo] for r in line], [r[hi] for r in line] - y]
        ax.errorbar(x, y, yerr=err, color=f"C{i}", marker="o", mfc=mfc, ls=ls, capsize=3,
                    label=f"{label}{'' if f == 'asr' else ' (control)'}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("poison ratio (%)")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{name} ({line[0]['protocol']})")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
  results.save_figure(fig, path)


def plot_accuracy(path: str, summary: list[dict]) -> None:
  """ASR vs clean accuracy, one point per configuration (colour: defense; marker: attack)."""
  fig, (ax,) = _figure(1)
  labels = list(dict.fromkeys(_label(r) for r in summary))
  names = list(dict.fromkeys(r["attack"] for r in summary))
  for r in summary:
    i, j = labels.index(_label(r)), names.index(r["attack"])
    ax.errorbar([r["clean_acc"]], [r["asr"]], xerr=[r["clean_acc_std"]], yerr=[r["asr_std"]],
                color=f"C{i}", marker="osD^v"[j % 5], capsize=2, ls="none")  # fmt: skip
    ax.annotate(f"{100 * r['poison_ratio']:g}%", (r["clean_acc"], r["asr"]), fontsize=6)
  for i, label in enumerate(labels):
    ax.plot([], [], color=f"C{i}", ls="none", marker="o", label=label)
  for j, name in enumerate(names):
    ax.plot([], [], color="gray", ls="none", marker="osD^v"[j % 5], label=name)
  ax.set_xlabel("clean test accuracy")
  ax.set_ylabel("attack success rate")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(True, alpha=0.3)
  ax.legend(frameon=False, fontsize=7)
  results.save_figure(fig, path)


def write(config, rows) -> list[dict]:
  """summary.csv, asr_vs_ratio.png, asr_vs_accuracy.png and a printed table; the summary."""
  summary = summarise(rows)
  results.write_csv(os.path.join(config.out, "summary.csv"), summary, SUMMARY_COLUMNS)
  if summary:
    plot_ratio(os.path.join(config.out, "asr_vs_ratio.png"), summary)
    plot_accuracy(os.path.join(config.out, "asr_vs_accuracy.png"), summary)
  table = [{**r, "defense": _label(r)} for r in summary]
  print(results.format_table(table, ["attack", "protocol", "poison_ratio", "n_poisons",
        "defense", "seeds", "asr", "asr_std", "control_asr", "clean_acc", "clean_acc_std",
        "control_clean_acc", "target_class_acc", "clean_train_loss", "epsilon"]))  # fmt: skip
  return summary
