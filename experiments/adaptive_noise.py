r"""Adaptive vs fixed noise against multi-poison attacks: the question §7.2 left open.

§7.2 proposes noise proportional to the previous epoch's mean per-example
gradient norm, so that noise shrinks as the model (and its gradients) settles,
and asks whether that would stop multi-poison attacks at a smaller utility cost
than DP-SGD's fixed noise. This experiment answers it with numbers.

Defenses, all clipping at C = `--noise_clip` (4): no noise (the common
anchor), fixed Gaussian noise sigma*C (`--fixed_multipliers`, defense "dp")
and adaptive noise sigma x previous epoch's mean clipped norm
(`--adaptive_multipliers`, defense "adaptive"); plus vanilla. For each, the
multi-poison Poison Frogs attack of `experiments/targeted/` (standard
scenario: pre-train and re-train with the defense, poisons 1..k added in
order over `--poison_counts`) gives the success rate (95% Wilson interval)
and poisons needed; the clean utility cost is the RAD of the model trained
with the defense on clean data (pre-training + the no-poison re-training)
against the vanilla model trained the same way, per seed.

Outputs in `--out`:
  multipoison/  the full targeted run (targeted.csv, attempts.csv, ...).
  adaptive.csv  one row per defense: mechanism, sigma, success rate and
                interval, poisons needed, utility RAD (mean, std over seeds).
  adaptive.png  success rate vs utility cost, fixed vs adaptive (the trade-off
                frontiers, with error bars), and poisons needed vs utility cost.
  answer.txt    the answer, derived from the numbers (also printed).

The answer compares the least utility cost at which each mechanism brings the
success rate to `--level` or below (default: half the vanilla rate, the
paper's Fig. 5 criterion), and counts which points of one frontier the other
dominates.

Presets. quick: softmax regression (LR, Adam / DP-Adam, lr 0.08) on
FashionMNIST, the stand-in for the paper's LR / Purchase-100 of §6.4 (why:
RESULTS.md, "§7.2 Adaptive noise"); 10,000 clean training points, 20
pre-training and 8 re-training epochs, 20 targets x 2 seeds, poison counts 1,
2, 4, 8; fixed sigma 0.01, 0.1, 0.4, 1 and adaptive sigma 0.1, 0.4, 1, 4
(adaptive noise scales with the mean clipped norm, below C = 4, so comparable
noise needs a larger sigma). The re-trainings are `experiments/targeted/`'s
(poisons take the slots of clean points); folders from older re-training
versions are refused on rerun.

Commands:
  python -m experiments.adaptive_noise --preset=smoke --out=runs/adaptive_smoke
  python -m experiments.adaptive_noise --preset=quick --out=runs/adaptive_noise

References:
  Hong et al. 2020, §6.4 (multi-poison; noise helps at a large utility cost),
  §7.2 (the adaptive mechanism, proposed and not built).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from absl import app
from absl import flags

from experiments import common
from experiments import targeted
from jaxshape import results


@dataclasses.dataclass(frozen=True)
class Config:
  out: str = "runs/adaptive_noise"
  data_dir: str | None = None
  download: bool = True
  seeds: int = 2
  progress: bool = True
  setup: str = "fashion_mnist:lr"
  attack: str = "poison_frogs"
  targets: int = 20
  noise_clip: float = 4.0
  fixed_multipliers: tuple[float, ...] = (0.01, 0.1, 0.4, 1.0)
  adaptive_multipliers: tuple[float, ...] = (0.1, 0.4, 1.0, 4.0)
  poison_counts: tuple[int, ...] = (1, 2, 4, 8)
  max_train: int | None = 10_000
  max_test: int | None = None
  pretrain_epochs: int = 20
  retrain_epochs: int = 8
  hidden: tuple[int, ...] = (256,)
  batch_size: int = 100
  candidates: int = 20
  craft_iters: int = 1_000
  level: float | None = None  # success level of the answer; None: half the vanilla rate
  max_batch: int | None = 16


PRESETS = {
  "smoke": Config(
    out="runs/adaptive_smoke",
    download=False,
    seeds=1,
    targets=2,
    fixed_multipliers=(0.1,),
    adaptive_multipliers=(0.5,),
    poison_counts=(1,),
    max_train=300,
    max_test=300,
    pretrain_epochs=2,
    retrain_epochs=2,
    hidden=(16,),
    batch_size=50,
    candidates=4,
    craft_iters=20,
    max_batch=None,
  ),
  "quick": Config(download=False),
  "paper": Config(
    seeds=3,
    setup="purchase100:lr",
    targets=100,
    max_train=None,
    pretrain_epochs=100,
    retrain_epochs=50,
    candidates=100,
    craft_iters=10_000,
    poison_counts=tuple(range(1, 11)),
    fixed_multipliers=(0.001, 0.01, 0.1, 0.4, 0.8, 1.0),
    adaptive_multipliers=(0.01, 0.1, 0.4, 1.0, 2.0, 4.0),
    max_batch=4,
  ),
}

COLUMNS = (
  "mechanism",
  "label",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "n",
  "successes",
  "success_rate",
  "ci_low",
  "ci_high",
  "mean_poisons",
  "std_poisons",
  "utility_rad",
  "utility_rad_std",
  "control_acc",
  "control_rate",
  "mean_rad",
)


def targeted_config(config: Config) -> targeted.Config:
  """The multi-poison run of experiments/targeted/ this experiment consists of."""
  return targeted.Config(
    out=os.path.join(config.out, "multipoison"),
    data_dir=config.data_dir,
    download=config.download,
    seeds=config.seeds,
    progress=config.progress,
    attacks=(config.attack,),
    mode="multipoison",
    scenario="standard",
    setups=(config.setup,),
    fallback=True,
    targets=config.targets,
    include_vanilla=True,
    clip_norms=(config.noise_clip,),
    noise_multipliers=tuple(config.fixed_multipliers),
    noise_clip=config.noise_clip,
    adaptive_multipliers=tuple(config.adaptive_multipliers),
    max_train=config.max_train,
    max_test=config.max_test,
    pretrain_epochs=config.pretrain_epochs,
    retrain_epochs=config.retrain_epochs,
    batch_size=config.batch_size,
    hidden=config.hidden,
    poison_counts=config.poison_counts,
    candidates=config.candidates,
    craft_iters=config.craft_iters,
    max_batch=config.max_batch,
  )


def mechanism(row: dict) -> str:
  if row["defense"] == "vanilla":
    return "vanilla"
  if row["defense"] == "adaptive":
    return "adaptive"
  return "clip only" if row["noise_multiplier"] == 0 else "fixed"


def table(summary: list[dict], controls: list[dict], seeds: int) -> list[dict]:
  """adaptive.csv rows: the targeted summary plus the utility cost's spread over seeds."""

  def control_acc(row, seed):
    accs = [
      c["acc_final"]
      for c in controls
      if c["seed"] == seed
      and c["defense"] == row["defense"]
      and results.canonical(c["clip_norm"]) == results.canonical(row["clip_norm"])
      and results.canonical(c["noise_multiplier"]) == results.canonical(row["noise_multiplier"])
    ]
    return accs[0] if accs else math.nan

  vanilla = next(s for s in summary if s["defense"] == "vanilla")
  out = []
  for s in summary:
    per_seed = np.asarray(
      [
        (control_acc(vanilla, k) - control_acc(s, k)) / control_acc(vanilla, k)
        for k in range(seeds)
      ],
      np.float64,
    )
    out.append(
      {
        "mechanism": mechanism(s),
        **{c: s[c] for c in COLUMNS if c in s},
        "utility_rad": float(np.mean(per_seed)),
        "utility_rad_std": float(np.std(per_seed, ddof=1)) if seeds > 1 else 0.0,
      }
    )
  return out


def frontier(rows: list[dict], name: str) -> list[dict]:
  """A mechanism's points in order of sigma, starting at the common clip-only anchor."""
  anchor = [r for r in rows if r["mechanism"] == "clip only"]
  own = sorted((r for r in rows if r["mechanism"] == name), key=lambda r: r["noise_multiplier"])
  return anchor + own


def answer(rows: list[dict], level: float | None) -> str:
  """The plain answer to §7.2's question, derived from the rows (never hard-coded)."""
  vanilla = next(r for r in rows if r["mechanism"] == "vanilla")
  v = vanilla["success_rate"]
  head = (
    f"Vanilla multi-poison success is {vanilla['successes']}/{vanilla['n']} = {v:.2f} "
    f"[{vanilla['ci_low']:.2f}, {vanilla['ci_high']:.2f}]"
  )
  if vanilla["successes"] == 0:
    return (
      f"{head}: the attack never succeeds without a defense in this setting, so the data "
      "cannot tell whether adaptive noise lowers its success more cheaply than fixed noise "
      "(inconclusive; strengthen the attack, e.g. more poisons or re-training epochs)."
    )
  level = v / 2 if level is None else level
  reach = {}
  for name in ("fixed", "adaptive"):
    ok = [r for r in frontier(rows, name) if r["success_rate"] <= level]
    reach[name] = min(ok, key=lambda r: r["utility_rad"]) if ok else None

  def describe(r):
    return (
      f"{r['label']} (success {r['success_rate']:.2f} [{r['ci_low']:.2f}, "
      f"{r['ci_high']:.2f}], utility RAD {r['utility_rad']:.3f})"
    )

  parts = [f"{head}; target level: success <= {level:.2f}."]
  f, a = reach["fixed"], reach["adaptive"]
  if f is None and a is None:
    best = {n: min(frontier(rows, n), key=lambda r: r["success_rate"]) for n in reach}
    parts.append(
      f"Neither mechanism reaches it in this grid (lowest: fixed "
      f"{describe(best['fixed'])}; adaptive {describe(best['adaptive'])}), so the "
      "question stays open here."
    )
  elif f is not None and a is not None and f["mechanism"] == a["mechanism"] == "clip only":
    parts.append(
      f"Clipping alone already reaches it ({describe(f)}): no noise of either kind is "
      "needed at this level, so the mechanisms do not differ here."
    )
  elif a is None or (f is not None and f["utility_rad"] < a["utility_rad"]):
    other = (
      f"; adaptive noise needs {describe(a)}"
      if a is not None
      else "; adaptive noise does not reach it in this grid"
    )
    parts.append(f"No: fixed noise reaches it at the smaller utility cost, {describe(f)}{other}.")
  elif f is None or a["utility_rad"] < f["utility_rad"]:
    other = (
      f"; fixed noise needs {describe(f)}"
      if f is not None
      else "; fixed noise does not reach it in this grid"
    )
    parts.append(
      f"Yes: adaptive noise reaches it at the smaller utility cost, {describe(a)}{other}."
    )
  else:
    parts.append(f"Both reach it at the same utility cost ({describe(f)}; {describe(a)}).")
  if f is not None and a is not None and f is not a:
    overlap = max(f["ci_low"], a["ci_low"]) <= min(f["ci_high"], a["ci_high"])
    gap = abs(f["utility_rad"] - a["utility_rad"])
    spread = max(f["utility_rad_std"], a["utility_rad_std"])
    if overlap or gap <= spread:
      parts.append(
        "Caution: the success intervals overlap"
        + (" and the utility gap is within the seed spread" if gap <= spread else "")
        + f", so with {vanilla['n']} target-seeds the difference is not significant."
      )
  dominated = {}
  for name, other in (("adaptive", "fixed"), ("fixed", "adaptive")):
    mine = [r for r in rows if r["mechanism"] == name]
    theirs = [r for r in rows if r["mechanism"] == other]
    dominated[name] = sum(
      any(
        o["success_rate"] <= r["success_rate"]
        and o["utility_rad"] <= r["utility_rad"]
        and (o["success_rate"] < r["success_rate"] or o["utility_rad"] < r["utility_rad"])
        for o in theirs
      )
      for r in mine
    )
  n_a = sum(r["mechanism"] == "adaptive" for r in rows)
  n_f = sum(r["mechanism"] == "fixed" for r in rows)
  parts.append(
    f"Across the grid, {dominated['adaptive']} of {n_a} adaptive points are dominated "
    f"(higher or equal success and utility cost) by a fixed point, and "
    f"{dominated['fixed']} of {n_f} fixed points by an adaptive one."
  )
  return " ".join(parts)


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


RULES = {
  "seeds": (1, None),
  "targets": (1, None),
  "noise_clip": (0, None, "open"),
  "fixed_multipliers": (0, None),
  "adaptive_multipliers": (0, None),
  "poison_counts": (1, None),
  "max_train": (1, None),
  "max_test": (1, None),
  "pretrain_epochs": (1, None),
  "retrain_epochs": (1, None),
  "hidden": (1, None),
  "batch_size": (1, None),
  "candidates": (1, None),
  "craft_iters": (1, None),
  "level": (0, 1),
  "max_batch": (1, None),
}


def run(config: Config) -> dict:
  """Runs the multi-poison grid, writes adaptive.csv / .png / answer.txt; returns rows, answer."""
  if not config.fixed_multipliers or not config.adaptive_multipliers:
    raise ValueError("need at least one fixed and one adaptive noise multiplier")
  common.check_config(config, RULES)
  out = common.prepare_out(config)
  with common.Timer() as timer:
    res = targeted.run(targeted_config(config))
  (setup,) = res["setups"].values()
  rows = table(setup["summary"], setup["controls"], config.seeds)
  results.write_csv(os.path.join(out, "adaptive.csv"), rows, COLUMNS)
  plot(os.path.join(out, "adaptive.png"), rows)
  text = answer(rows, config.level)
  with results.atomic_open(os.path.join(out, "answer.txt")) as f:
    f.write(text + "\n")
  print(
    results.format_table(
      rows,
      [
        "mechanism",
        "noise_multiplier",
        "success_rate",
        "ci_low",
        "ci_high",
        "mean_poisons",
        "utility_rad",
        "control_acc",
      ],
    )
  )
  print(f"\nAnswer (§7.2): {text}")
  print(f"wall time {timer.seconds:.1f} s; results in {out}")
  return {"rows": rows, "answer": text, "seconds": timer.seconds, "targeted": res}


def main(argv):
  del argv
  fl = flags.FLAGS
  floats = lambda v: tuple(float(x) for x in v) if v is not None else None
  run(
    common.config_from_flags(
      PRESETS,
      {
        "targets": fl.targets,
        "fixed_multipliers": floats(fl.fixed_multipliers),
        "adaptive_multipliers": floats(fl.adaptive_multipliers),
        "noise_clip": fl.noise_clip,
        "poison_counts": tuple(int(k) for k in fl.poison_counts or ()),
        "max_train": fl.max_train,
        "retrain_epochs": fl.retrain_epochs,
        "level": fl.level,
        "setup": fl.setup,
        "max_batch": fl.max_batch,
      },
    )
  )


def define_flags():
  common.define_common_flags()
  flags.DEFINE_integer("targets", None, "Number of targets.")
  flags.DEFINE_list("fixed_multipliers", None, "Fixed noise multipliers sigma (std sigma*C).")
  flags.DEFINE_list("adaptive_multipliers", None, "Adaptive multipliers (std sigma x mean norm).")
  flags.DEFINE_float("noise_clip", None, "Clip norm C of every noisy defense (default 4).")
  flags.DEFINE_list("poison_counts", None, "Numbers of poisons tried, in order.")
  flags.DEFINE_integer("max_train", None, "Train on a fixed random subset of this size.")
  flags.DEFINE_integer("retrain_epochs", None, "Re-training epochs.")
  flags.DEFINE_float("level", None, "Success level of the answer (default: half of vanilla).")
  flags.DEFINE_string("setup", None, "dataset:model (default fashion_mnist:lr).")
  flags.DEFINE_integer("max_batch", None, "Re-trainings per compiled call (memory).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
