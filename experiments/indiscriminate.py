r"""Indiscriminate poisoning vs gradient shaping (§6.2 Fig. 4; §7.1 Fig. 8; App. E Fig. 11).

Softmax regression on FashionMNIST-3/4 (dress vs coat), trained from scratch
with Adam / DP-Adam (lr 0.01, batch 300, 40 epochs) on the clean set plus
poisons *added* at each ratio, against random label flipping (LF) and
Steinhardt et al.'s min-max attack. Defenses: vanilla; clipping only
(`--clip_norms`, sigma = 0); clipping at `--noise_clip` plus Gaussian noise
(`--noise_multipliers`); and, with `--adaptive`, clipping at `--noise_clip`
plus the §7.2 adaptive noise (`--adaptive_multipliers`).

Every (ratio, defense, seed) of an attack runs in one vmapped program per
defense kind: poisoned sets are padded to the largest ratio and masked, so
one compilation serves all ratios, and every job names its training set by
row index into one shared pool (clean points, then each variant's poisons),
so the grid holds one copy of the data. Outputs in `--out`:
  epochs.csv   one row per job x epoch (test accuracy, training accuracy on
               clean and on poison points, loss, norms): the resumable sweep.
  results.csv  one row per job: `attack, poison_ratio, n_poisons, defense,
               clip_norm, noise_multiplier, seed, clean_acc, acc_best,
               acc_final, rad_best, rad_final, epsilon`. `clean_acc` is the
               best test accuracy of the model trained with the same defense
               and seed on the clean set (ratio 0); rad_best compares best
               accuracies, rad_final final ones.
  rad.png      RAD vs poison ratio per attack and defense (Fig. 4a,b,d,e).
  train_acc.png clean vs poison training accuracy per epoch at the largest
               ratio (Fig. 11); pca.png the poisons in 2-D PCA with KMeans
               (Fig. 8) and `pca.csv` with the cluster counts.

Commands (wall times in README / RESULTS.md):
  python -m experiments.indiscriminate --preset=smoke --out=runs/indiscriminate_smoke
  python -m experiments.indiscriminate --preset=quick --out=runs/indiscriminate  # make demo
  python -m experiments.indiscriminate --preset=paper --out=runs/indiscriminate_paper

References:
  Hong et al. 2020, §6.2 (Fig. 4), §7.1 (Fig. 8), Appendix E (Fig. 11), §7.2.
  Steinhardt, Koh & Liang 2017, "Certified Defenses for Data Poisoning Attacks".
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from experiments import common
from jaxshape import accounting
from jaxshape import analysis
from jaxshape import models
from jaxshape import poisons
from jaxshape import report
from jaxshape import results
from jaxshape import sweep
from jaxshape import train

ATTACKS = ("label_flip", "steinhardt")
PAPER_RATIOS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3, 0.4)


@dataclasses.dataclass(frozen=True)
class Config:
  out: str = "runs/indiscriminate"
  data_dir: str | None = None
  dataset: str = "fashion_mnist_3_4"
  attacks: tuple[str, ...] = ATTACKS
  poison_ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.4)
  clip_norms: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0, 0.1)
  noise_multipliers: tuple[float, ...] = (1e-1, 1e-3, 1e-5, 1e-7)
  noise_clip: float = 4.0
  adaptive: bool = False
  adaptive_multipliers: tuple[float, ...] = (1e-1, 1.0)
  seeds: int = 3
  epochs: int = 40
  batch_size: int = 300
  learning_rate: float = 0.01
  max_train: int | None = None  # subsample the clean training set (smoke tests)
  steinhardt_iterations: int = 200
  max_batch: int | None = 64
  delta: float = 1e-5
  progress: bool = True


PRESETS = {
  "smoke": Config(
    seeds=2,
    epochs=2,
    poison_ratios=(0.0, 0.2, 0.4),
    clip_norms=(4.0,),
    noise_multipliers=(1e-3,),
    adaptive=True,
    adaptive_multipliers=(0.1,),
    max_train=600,
    steinhardt_iterations=6,
    max_batch=None,
  ),
  "quick": Config(),
  "paper": Config(
    poison_ratios=PAPER_RATIOS,
    noise_multipliers=(1e-1, 1e-2, 1e-3, 1e-5, 1e-6, 1e-7),
    adaptive=True,
  ),
}

EPOCH_COLUMNS = (
  "attack",
  "poison_ratio",
  "n_poisons",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "epoch",
  "test_acc",
  "train_acc_clean",
  "train_acc_poison",
  "train_loss",
  "norm_mean",
  "frac_clipped",
)
RESULT_COLUMNS = (
  "attack",
  "poison_ratio",
  "n_poisons",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "clean_acc",
  "acc_best",
  "acc_final",
  "rad_best",
  "rad_final",
  "epsilon",
)


def defenses(config: Config) -> list[common.Defense]:
  """The `common.Defense` (kind, clip norm, noise multiplier) of every row of the grid."""
  adaptive = config.adaptive_multipliers if config.adaptive else ()
  return common.defense_grid(
    True, config.clip_norms, config.noise_clip, config.noise_multipliers, adaptive
  )


def _load(config: Config):
  ds = common.load_data(config, config.dataset)
  x, y = ds.x_train, ds.y_train
  if config.max_train is not None and config.max_train < x.shape[0]:
    keep = np.random.default_rng(0).permutation(x.shape[0])[: config.max_train]
    x, y = x[keep], y[keep]
  return ds, np.asarray(x, np.float32), np.asarray(y, np.int32)


def craft(config: Config, attack: str, x, y, num_classes: int):
  """Poison variants `[V, P, ...]` with labels and, per (ratio, seed), (variant, count).

  Label flipping draws the largest ratio's poisons once per seed and uses the
  first round(ratio N) of them for smaller ratios (a random subset is again a
  random label flip). Steinhardt's attack depends on the ratio (the poison
  mass drags the defense's centroids) and not on a seed, so it is crafted once
  per ratio.
  """
  n = x.shape[0]
  counts = {r: int(round(r * n)) for r in config.poison_ratios}
  p_max = max(max(counts.values()), 1)
  xs, ys, index = [], [], {}
  if attack == "label_flip":
    for seed in range(config.seeds):
      ps = poisons.label_flip(jax.random.key(seed), x, y, p_max / n, num_classes=num_classes)
      xs.append(np.asarray(ps.x))
      ys.append(np.asarray(ps.y))
      for r in config.poison_ratios:
        index[r, seed] = (seed, counts[r])
  elif attack == "steinhardt":
    for v, r in enumerate(config.poison_ratios):
      if counts[r] == 0:
        px, py = np.zeros((p_max, *x.shape[1:]), np.float32), np.zeros(p_max, np.int32)
      else:
        ps = poisons.steinhardt(x, y, r, iterations=config.steinhardt_iterations)
        px, py = _pad(np.asarray(ps.x), p_max), _pad(np.asarray(ps.y), p_max)
      xs.append(px)
      ys.append(py)
      for seed in range(config.seeds):
        index[r, seed] = (v, counts[r])
  else:
    raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
  return np.stack(xs), np.stack(ys), index


def _pad(a, size):
  if a.shape[0] >= size:
    return a[:size]
  return np.concatenate([a, np.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)])


def _map_rows(fn, rows, chunk: int = 1024):
  """`fn(rows)` evaluated on chunks of `rows` (bounds the gathered rows held at once)."""
  pad = -rows.shape[0] % chunk
  padded = jnp.concatenate([rows, jnp.repeat(rows[:1], pad)]).reshape(-1, chunk)
  return jax.lax.map(fn, padded).reshape(-1)[: rows.shape[0]]


def _build(config: Config, num_classes: int, n_clean: int, p_max: int):
  model = models.LR(num_classes)
  loss_fn = models.ClassifierLoss(model)

  def build(defense: str):
    spec = train.TrainSpec(
      loss_fn,
      optimizer="adam",
      defense=defense,
      batch_size=config.batch_size,
      epochs=config.epochs,
    )

    def program(values, key, shared):
      # The pool holds the clean points once, then every variant's poisons
      # (`craft`); a job's training set is clean + its variant's first
      # n_poisons poisons, named by row index, so the vmapped grid shares one
      # copy of the data (`train.num_examples`).
      v = values["variant"].astype(jnp.int32)
      rows_P = n_clean + v * p_max + jnp.arange(p_max)
      active_P = (jnp.arange(p_max) < values["n_poisons"]).astype(jnp.float32)
      fit_data = {
        "x": shared["pool_x"],
        "y": shared["pool_y"],
        "index": jnp.concatenate([jnp.arange(n_clean), rows_P]),
        "mask": jnp.concatenate([jnp.ones([n_clean]), active_P]),
      }
      x_clean, y_clean = shared["pool_x"][:n_clean], shared["pool_y"][:n_clean]

      def eval_fn(params):
        # Training accuracy on clean and on poison points (Appendix E, Fig. 11).
        correct_P = _map_rows(
          lambda r: models.predict(model, params, shared["pool_x"][r]) == shared["pool_y"][r],
          rows_P,
        )
        return {
          "test_acc": train.accuracy(model, params, shared["x_test"], shared["y_test"]),
          "train_acc_clean": train.accuracy(model, params, x_clean, y_clean),
          "train_acc_poison": jnp.sum(correct_P * active_P) / jnp.maximum(jnp.sum(active_P), 1),
        }

      hparams = train.HParams.create(
        values["learning_rate"], values["l2_norm_clip"], values["noise_multiplier"]
      )
      return train.fit(spec, hparams, key, fit_data, eval_fn=eval_fn).records

    return program

  return build


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


RULES = {
  "attacks": ATTACKS,
  "poison_ratios": (0, 1),
  "clip_norms": (0, None, "open"),
  "noise_multipliers": (0, None),
  "noise_clip": (0, None, "open"),
  "adaptive_multipliers": (0, None),
  "seeds": (1, None),
  "epochs": (1, None),
  "batch_size": (1, None),
  "learning_rate": (0, None, "open"),
  "max_train": (1, None),
  "steinhardt_iterations": (1, None),
  "max_batch": (1, None),
  "delta": (0, 1, "open"),
}


def run(config: Config) -> dict:
  """Crafts, trains the grid, writes epochs.csv, results.csv and plots; returns the rows."""
  common.check_config(config, RULES)
  out = common.prepare_out(config)
  ds, x, y = _load(config)
  epochs_csv = os.path.join(out, "epochs.csv")
  grid = defenses(config)
  crafted = {}
  with common.Timer() as timer:
    for attack in config.attacks:
      with common.Timer() as craft_timer:
        px_V, py_V, index = craft(config, attack, x, y, ds.num_classes)
      crafted[attack] = (px_V, py_V, index)
      print(
        f"{attack}: crafted {px_V.shape[0]} poison variant(s) of up to {px_V.shape[1]} "
        f"poisons in {craft_timer.seconds:.1f} s"
      )
      jobs = []
      for (ratio, seed), (variant, count) in sorted(index.items()):
        for defense, clip, sigma in grid:
          values = {
            "variant": variant,
            "n_poisons": count,
            "learning_rate": config.learning_rate,
            "l2_norm_clip": clip,
            "noise_multiplier": sigma,
          }
          key = {
            "attack": attack,
            "poison_ratio": ratio,
            "defense": defense,
            "clip_norm": clip,
            "noise_multiplier": sigma,
            "seed": seed,
          }
          jobs.append(sweep.Job(defense, values, seed, key))
      build = _build(config, ds.num_classes, x.shape[0], px_V.shape[1])
      shared = {
        "pool_x": np.concatenate([x, px_V.reshape(-1, *x.shape[1:])]),
        "pool_y": np.concatenate([y, py_V.reshape(-1)]),
        "x_test": np.asarray(ds.x_test),
        "y_test": np.asarray(ds.y_test),
      }

      def to_rows(job, records, n=x.shape[0]):
        count = int(job.values["n_poisons"])
        return [
          {
            **job.key,
            "n_poisons": count,
            "epoch": e + 1,
            **{k: float(records[k][e]) for k in EPOCH_COLUMNS[8:]},
          }
          for e in range(config.epochs)
        ]

      epoch_rows = sweep.run(
        build,
        jobs,
        epochs_csv,
        to_rows=to_rows,
        columns=EPOCH_COLUMNS,
        max_batch=config.max_batch,
        progress=config.progress,
        desc=f"indiscriminate {attack}",
        shared=shared,
      )
  rows = summarize(epoch_rows, config, x.shape[0])
  rows = [r for r in rows if r["attack"] in config.attacks]
  results.write_csv(os.path.join(out, "results.csv"), rows, RESULT_COLUMNS)
  plot_rad(os.path.join(out, "rad.png"), rows, config.attacks)
  _plot_train_acc(os.path.join(out, "train_acc.png"), epoch_rows, config)
  pca_rows = _pca(out, crafted, x, y, config)
  print(summary_table(rows, config))
  print(f"wall time {timer.seconds:.1f} s (crafting included); {report.files_note(out)}")
  return {"rows": rows, "epoch_rows": epoch_rows, "pca": pca_rows, "seconds": timer.seconds}


def _plot_train_acc(path, epoch_rows, config):
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


def _pca(out, crafted, x, y, config):
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


def main(argv):
  del argv
  fl = flags.FLAGS
  overrides = {
    "attacks": tuple(fl.attacks or ()),
    "poison_ratios": tuple(map(float, fl.poison_ratios or ())),
    "clip_norms": tuple(map(float, fl.clip_norms or ())),
    "noise_multipliers": tuple(map(float, fl.noise_multipliers or ())),
    "noise_clip": fl.noise_clip,
    "adaptive": fl.adaptive,
    "epochs": fl.epochs,
    "dataset": fl.dataset,
    "max_batch": fl.max_batch,
  }
  run(common.config_from_flags(PRESETS, overrides))


def define_flags():
  common.define_common_flags()
  flags.DEFINE_list("attacks", None, f"Attacks, from {ATTACKS}.")
  flags.DEFINE_list("poison_ratios", None, "Poison ratios (poisons / clean), 0 included.")
  flags.DEFINE_list("clip_norms", None, "Clip norms of the clip-only rows (sigma = 0).")
  flags.DEFINE_list("noise_multipliers", None, "Noise multipliers (with C = --noise_clip).")
  flags.DEFINE_float("noise_clip", None, "Clip norm of the noise rows.")
  flags.DEFINE_bool("adaptive", None, "Add the §7.2 adaptive-noise rows.")
  flags.DEFINE_integer("epochs", None, "Training epochs.")
  flags.DEFINE_string("dataset", None, "Dataset name (default fashion_mnist_3_4).")
  flags.DEFINE_integer("max_batch", None, "Most jobs per compiled call (memory).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
