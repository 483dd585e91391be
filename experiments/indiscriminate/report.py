"""From per-epoch rows to results.csv, the printed table and the figures (Fig. 4, 8, 11).

References:
  Hong et al. 2020, §6.2 (Fig. 4), §7.1 (Fig. 8), Appendix E (Fig. 11).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from experiments import common
from experiments.indiscriminate.config import RESULT_COLUMNS
from experiments.indiscriminate.config import Config
from experiments.indiscriminate.config import defenses
from jaxshape import accounting
from jaxshape import analysis
from jaxshape import report
from jaxshape import results


def _epsilon(config: Config, defense: str, sigma: float, n_total: int) -> float:
  if defense == "adaptive":
    return math.nan  # data-dependent noise: no DP guarantee (§7.2)
  steps = config.epochs * -(-n_total // config.batch_size)
  return accounting.epsilon(
    sigma if defense == "dp" else 0.0,
    config.batch_size / n_total,
    steps,
    config.delta,
    sampling=common.SAMPLING,
  )


def summarize(epoch_rows: list[dict], config: Config, n_clean: int) -> list[dict]:
  """results.csv rows from the per-epoch rows: best/final accuracy, RAD, epsilon."""
  by_job: dict[tuple, list[dict]] = {}
  for row in epoch_rows:
    job = tuple(row[c] for c in RESULT_COLUMNS[:7])
    by_job.setdefault(job, []).append(row)
  clean = {}
  for job, rows in by_job.items():
    attack, ratio, _, defense, clip, sigma, seed = job
    if ratio == 0:
      accs = [r["test_acc"] for r in sorted(rows, key=lambda r: r["epoch"])]
      clean[attack, defense, clip, sigma, seed] = (max(accs), accs[-1])
  out = []
  for job, rows in sorted(by_job.items(), key=lambda kv: tuple(map(str, kv[0]))):
    attack, ratio, n_poisons, defense, clip, sigma, seed = job
    accs = [r["test_acc"] for r in sorted(rows, key=lambda r: r["epoch"])]
    ref = clean.get((attack, defense, clip, sigma, seed))
    best, final = max(accs), accs[-1]
    out.append(
      {
        **dict(zip(RESULT_COLUMNS[:7], job, strict=True)),
        "clean_acc": ref[0] if ref else math.nan,
        "acc_best": best,
        "acc_final": final,
        "rad_best": (ref[0] - best) / ref[0] if ref else math.nan,
        "rad_final": (ref[1] - final) / ref[1] if ref else math.nan,
        "epsilon": _epsilon(config, defense, sigma, n_clean + int(n_poisons)),
      }
    )
  return out


def _label(defense, clip, sigma):
  return common.Defense(defense, float(clip), float(sigma)).label


def summary_table(rows: list[dict], config: Config) -> str:
  """Per attack: defenses x poison ratios, RAD at the best epoch (mean ± std over seeds)."""
  rank = {d: i for i, d in enumerate(defenses(config))}  # lines in the grid's order
  rows = sorted(rows, key=lambda r: rank.get(common.Defense.from_row(r), len(rank)))
  parts = []
  for attack in config.attacks:
    if not any(r["attack"] == attack for r in rows):
      continue
    parts.append(
      f"\n{attack}: RAD at the best epoch, mean ± std over {config.seeds} seeds; "
      "clean acc: best epoch without poisons"
    )
    parts.append(
      report.pivot_table(
        [r for r in rows if r["attack"] == attack],
        row_by=("defense", "clip_norm", "noise_multiplier"),
        column_by="poison_ratio",
        value="rad_best",
        row_label=lambda r: _label(r["defense"], r["clip_norm"], r["noise_multiplier"]),
        column_label=lambda ratio: f"{100 * ratio:g}% poisons",
        side_columns={"clean acc": "clean_acc"},
        span_columns={"epsilon": "epsilon"},
        row_header="defense",
      )
    )
  parts.append(
    f"epsilon at delta={config.delta:g}: {accounting.assumption(sampling=common.SAMPLING)} "
    "(the sampling training used; the paper's Poisson-sampling epsilon would be far smaller "
    "and does not hold for shuffled batches, Chua et al. 2024); "
    "- = no DP guarantee (adaptive noise)"
  )
  return "\n".join(parts)


def plot_rad(path: str, rows: list[dict], attacks) -> None:
  panels = []
  for attack in attacks:
    series = {}
    stats = results.mean_std(
      [r for r in rows if r["attack"] == attack],
      by=("defense", "clip_norm", "noise_multiplier", "poison_ratio"),
      value="rad_best",
    )
    for s in stats:
      label = _label(s["defense"], s["clip_norm"], s["noise_multiplier"])
      series.setdefault(label, []).append((100 * s["poison_ratio"], s["mean"], s["std"]))
    panels.append(
      (attack, {k: tuple(map(np.array, zip(*sorted(v), strict=True))) for k, v in series.items()})
    )
  results.panel_plot(
    path, panels, xlabel="poisons (% of clean training set)", ylabel="RAD (best epoch)"
  )


def plot_train_acc(path, epoch_rows, config):
  """Fig. 11: training accuracy on clean vs poison points per epoch, largest ratio, seed mean."""
  ratio = max(config.poison_ratios)
  if ratio == 0:
    return
  panels = []
  for attack in config.attacks:
    series = {}
    for defense, clip, sigma in [("vanilla", math.inf, 0.0), ("dp", config.noise_clip, 0.0)]:
      rows = [
        r
        for r in epoch_rows
        if r["attack"] == attack
        and r["poison_ratio"] == ratio
        and r["defense"] == defense
        and r["clip_norm"] == clip
        and r["noise_multiplier"] == sigma
      ]
      if not rows:
        continue
      for part in ("clean", "poison"):
        stats = results.mean_std(rows, by=("epoch",), value=f"train_acc_{part}")
        series[f"{_label(defense, clip, sigma)}: {part}"] = (
          np.array([s["epoch"] for s in stats]),
          np.array([s["mean"] for s in stats]),
          np.array([s["std"] for s in stats]),
        )
    panels.append((f"{attack} at {100 * ratio:g}%", series))
  results.panel_plot(path, panels, xlabel="epoch", ylabel="training accuracy")


def pca(out, crafted, x, y, config):
  """§7.1: clean vs poison points in 2-D PCA, KMeans on the poisons; cluster counts."""
  ratio = max(config.poison_ratios)
  sets = {}
  for attack, (px_V, py_V, index) in crafted.items():
    variant, count = index[ratio, 0]
    if count:
      sets[attack] = (px_V[variant][:count], py_V[variant][:count])
  if not sets:
    return []
  rows = analysis.plot_poison_pca(os.path.join(out, "pca.png"), x, y, sets, key=jax.random.key(0))
  results.write_csv(os.path.join(out, "pca.csv"), rows, list(rows[0].keys()))
  return rows
