r"""Utility of DP-SGD models vs clip norm C and noise multiplier sigma (paper App. F, Fig. 12).

Three models, each trained from scratch with plain SGD (vanilla) and DP-SGD
over a grid of C x sigma, batch 100, for several seeds:

  LR   on Purchase-100   lr 0.08
  MLP  on FashionMNIST   lr 0.08 (one hidden layer of 256, the paper's Table 4)
  CNN  on CIFAR-10       lr 0.02 (Table 4: conv16-conv32-pool-dense64)

(the §6.3 training setup: batch 100, these learning rates, 100 epochs of
clean training in the paper preset). C in {8, 4, 2, 1, 0.1}; sigma in {0}
plus the targeted grid {0.001, 0.01, 0.1, 0.4, 0.8, 1, 2, 4} (PROTOCOL.md);
sigma = 0 is clipping only. Every (C, sigma, seed) of a model runs in one
vmapped sweep (`jaxshape.sweep.run`, resumable).

Where Purchase-100 or CIFAR-10 is missing (`data.load` raises
FileNotFoundError), the quick preset substitutes FashionMNIST (LR on
FashionMNIST-3/4, the CNN on FashionMNIST) and prints and records the
substitution (`datasets.json`, the `dataset` column, the plot titles); the
paper preset fails instead. The quick preset also stays affordable on two CPU
cores: a subset of the grid (C all five, sigma in {0, 0.01, 0.1, 1, 4}), 3
seeds (RESULTS.md reports mean +- std over at least 3), few epochs, and for
the CNN subsamples: LR all 10,800 FashionMNIST-3/4 points x 5 epochs, MLP
all 60,000 FashionMNIST points x 3 epochs, CNN 2,000 random FashionMNIST
training points x 3 epochs, tested on 2,000. Its
accuracies are those of short training runs: they show the trend of Fig. 12,
not its levels.

Outputs in `--out`:
  utility.csv    one row per model x (C, sigma) x seed (and vanilla: C inf):
                 `model, dataset, defense, clip_norm, noise_multiplier, seed,
                 test_acc, epsilon` (epsilon: RDP accountant, delta 1e-5,
                 shuffled fixed batches as trained, steps = epochs x
                 ceil(N / batch); inf for sigma 0 and vanilla).
  utility.png    test accuracy vs sigma, one line per C, one panel per model,
                 mean +- std over seeds (vanilla as a dashed band).
  datasets.json  the data set each model used, and why.

Commands:
  python -m experiments.utility --preset=smoke --out=runs/utility_smoke
  python -m experiments.utility --preset=quick --out=runs/utility
  python -m experiments.utility --preset=paper --data_dir=/path/with/purchase_and_cifar \
      --out=runs/utility_paper

References:
  Hong et al. 2020, Appendix F (Fig. 12), §6.3 (training setup), Appendix B
  (DP-SGD), Appendix C (architectures). Mironov 2017 (Renyi DP accounting).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from absl import app
from absl import flags

from experiments import common
from jaxshape import accounting
from jaxshape import models
from jaxshape import results
from jaxshape import sweep
from jaxshape import train

PAPER_CLIP_NORMS = (8.0, 4.0, 2.0, 1.0, 0.1)
PAPER_NOISE_MULTIPLIERS = (0.0, 0.001, 0.01, 0.1, 0.4, 0.8, 1.0, 2.0, 4.0)
MODEL_NAMES = ("lr", "mlp", "cnn")

COLUMNS = (
  "model",
  "dataset",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "test_acc",
  "epsilon",
)


@dataclasses.dataclass(frozen=True)
class ModelRun:
  """One model of Fig. 12: its data set, the stand-in when that is missing, and its budget."""

  model: str  # "lr", "mlp" or "cnn"
  dataset: str  # the paper's
  fallback: str  # used instead when `dataset` is missing and `Config.fallback` is set
  learning_rate: float
  epochs: int
  max_train: int | None = None  # subsample of the training set (None: all)
  max_test: int | None = None  # subsample of the test set (None: all)


PAPER_RUNS = (
  ModelRun("lr", "purchase100", "fashion_mnist_3_4", 0.08, 100),
  ModelRun("mlp", "fashion_mnist", "fashion_mnist", 0.08, 100),
  ModelRun("cnn", "cifar10", "fashion_mnist", 0.02, 100),
)
QUICK_RUNS = (
  ModelRun("lr", "purchase100", "fashion_mnist_3_4", 0.08, 5),
  ModelRun("mlp", "fashion_mnist", "fashion_mnist", 0.08, 3),
  ModelRun("cnn", "cifar10", "fashion_mnist", 0.02, 3, max_train=2_000, max_test=2_000),
)
SMOKE_RUNS = (
  ModelRun("lr", "purchase100", "fashion_mnist_3_4", 0.08, 1, max_train=300, max_test=200),
  ModelRun("mlp", "fashion_mnist", "fashion_mnist", 0.08, 1, max_train=300, max_test=200),
  ModelRun("cnn", "cifar10", "fashion_mnist", 0.02, 1, max_train=200, max_test=100),
)


@dataclasses.dataclass(frozen=True)
class Config:
  out: str = "runs/utility"
  data_dir: str | None = None
  runs: tuple[ModelRun, ...] = PAPER_RUNS
  models: tuple[str, ...] = MODEL_NAMES
  clip_norms: tuple[float, ...] = PAPER_CLIP_NORMS
  noise_multipliers: tuple[float, ...] = PAPER_NOISE_MULTIPLIERS
  vanilla: bool = True  # also train without DP (the reference line)
  seeds: int = 3
  batch_size: int = 100
  epochs: int | None = None  # overrides every model's epochs
  fallback: bool = False  # substitute FashionMNIST for missing Purchase-100 / CIFAR-10
  download: bool = True  # let tensorflow-datasets download missing data
  delta: float = 1e-5
  max_batch: int | None = 24  # most jobs per compiled call
  progress: bool = True


PRESETS = {
  "smoke": Config(
    runs=SMOKE_RUNS,
    clip_norms=(4.0, 0.1),
    noise_multipliers=(0.0, 1.0),
    seeds=2,
    fallback=True,
    download=False,
    max_batch=None,
  ),
  "quick": Config(
    runs=QUICK_RUNS,
    noise_multipliers=(0.0, 0.01, 0.1, 1.0, 4.0),
    seeds=3,
    fallback=True,
    download=False,
  ),
  "paper": Config(),
}


RULES = {
  "clip_norms": (0, None, "open"),
  "noise_multipliers": (0, None),
  "seeds": (1, None),
  "batch_size": (1, None),
  "epochs": (1, None),
  "delta": (0, 1, "open"),
  "max_batch": (1, None),
}


def _validate(config: Config) -> None:
  known = {r.model for r in config.runs}
  for name in config.models:
    if name not in known:
      raise ValueError(f"--models must be among {sorted(known)}, got {name!r}")
  common.check_config(config, RULES)


def defense_grid(config: Config) -> list[common.Defense]:
  """The `common.Defense` of every row of a model's grid: vanilla and every (C, sigma)."""
  grid = [common.VANILLA] if config.vanilla else []
  grid += [
    common.Defense("dp", float(c), float(s))
    for c in config.clip_norms
    for s in config.noise_multipliers
  ]
  return list(dict.fromkeys(grid))


def load(config: Config, run: ModelRun) -> tuple[dict, str]:
  """The model's data (subsampled) and a note saying which data set it is and why."""
  try:
    ds = common.load_data(config, run.dataset, download=config.download)
    note = f"{run.model.upper()}: {run.dataset} (the paper's)"
  except FileNotFoundError as e:
    if not config.fallback:
      raise
    first_line = str(e).splitlines()[0].split(". Looked in")[0]
    ds = common.load_data(config, run.fallback, download=config.download)
    note = (
      f"{run.model.upper()}: {run.fallback} INSTEAD OF {run.dataset} ({first_line}); "
      "a stand-in, not the paper's setting"
    )
  x, y = common.subsample(ds.x_train, ds.y_train, run.max_train, 0)
  x_test, y_test = common.subsample(ds.x_test, ds.y_test, run.max_test, 1)
  if run.max_train is not None or run.max_test is not None:
    note += f"; {x.shape[0]} training / {x_test.shape[0]} test points"
  return {
    "name": ds.name,
    "x": x,
    "y": y,
    "x_test": x_test,
    "y_test": y_test,
    "num_classes": ds.num_classes,
  }, note


def _model(name: str, num_classes: int):
  return models.make_model(name, num_classes)


def _build(config: Config, run: ModelRun, num_classes: int, epochs: int):
  model = _model(run.model, num_classes)
  loss_fn = models.ClassifierLoss(model)

  def build(group):
    _, defense = group
    spec = train.TrainSpec(
      loss_fn, optimizer="sgd", defense=defense, batch_size=config.batch_size, epochs=epochs
    )

    def program(values, key, shared):
      hparams = train.HParams.create(
        values["learning_rate"], values["l2_norm_clip"], values["noise_multiplier"]
      )
      params = train.fit(spec, hparams, key, {"x": shared["x"], "y": shared["y"]}).params
      return {"test_acc": train.accuracy(model, params, shared["x_test"], shared["y_test"])}

    return program

  return build


def epsilon(config: Config, sigma: float, num_train: int, epochs: int) -> float:
  """epsilon at `config.delta` of `epochs` passes of batch `config.batch_size` over `num_train`."""
  steps = epochs * -(-num_train // config.batch_size)
  q = min(1.0, config.batch_size / num_train)
  return accounting.epsilon(sigma, q, steps, config.delta, sampling=common.SAMPLING)


def _run_model(config: Config, run: ModelRun, d: dict, csv_path: str) -> list[dict]:
  epochs = config.epochs if config.epochs is not None else run.epochs
  n = d["x"].shape[0]
  eps = {s: epsilon(config, s, n, epochs) for s in {g[2] for g in defense_grid(config)}}
  jobs = []
  for defense, clip, sigma, _ in defense_grid(config):
    for seed in range(config.seeds):
      values = {"learning_rate": run.learning_rate, "l2_norm_clip": clip, "noise_multiplier": sigma}
      key = {
        "model": run.model,
        "dataset": d["name"],
        "defense": defense,
        "clip_norm": clip,
        "noise_multiplier": sigma,
        "seed": seed,
      }
      jobs.append(sweep.Job((run.model, defense), values, seed, key))

  def to_rows(job, out):
    is_dp = job.key["defense"] == "dp"
    return [
      {
        **job.key,
        "test_acc": float(out["test_acc"]),
        "epsilon": eps[job.key["noise_multiplier"]] if is_dp else math.inf,
      }
    ]

  shared = {k: d[k] for k in ("x", "y", "x_test", "y_test")}
  with common.Timer() as timer:
    rows = sweep.run(
      _build(config, run, d["num_classes"], epochs),
      jobs,
      csv_path,
      to_rows=to_rows,
      columns=COLUMNS,
      max_batch=config.max_batch,
      progress=config.progress,
      desc=f"utility {run.model}",
      shared=shared,
    )
  print(
    f"{run.model}: {len(jobs)} jobs ({epochs} epochs of {n} points each) in {timer.seconds:.1f} s"
  )
  return rows


def _selected(rows: list[dict], config: Config, datasets: dict[str, str]) -> list[dict]:
  wanted = {
    tuple(map(results.canonical, (m, datasets[m], d, c, s, seed)))
    for m in config.models
    for d, c, s, _ in defense_grid(config)
    for seed in range(config.seeds)
  }
  return [r for r in rows if tuple(results.canonical(r[c]) for c in COLUMNS[:6]) in wanted]


def accuracy_table(rows: list[dict], model: str, config: Config) -> str:
  """Mean +- std test accuracy of one model: a row per C, a column per sigma (and vanilla)."""
  stats = results.mean_std(
    [r for r in rows if r["model"] == model],
    by=("defense", "clip_norm", "noise_multiplier"),
    value="test_acc",
  )
  cell = {
    (s["defense"], results.canonical(s["clip_norm"]), results.canonical(s["noise_multiplier"])): s
    for s in stats
  }
  table = []
  for c in config.clip_norms:
    row = {"C": c}
    for sigma in config.noise_multipliers:
      s = cell.get(("dp", results.canonical(c), results.canonical(sigma)))
      row[f"s={sigma:g}"] = f"{s['mean']:.3f}+-{s['std']:.3f}" if s else ""
    table.append(row)
  vanilla = cell.get(("vanilla", results.canonical(math.inf), results.canonical(0.0)))
  if vanilla:
    table.append(
      {
        "C": "vanilla",
        f"s={config.noise_multipliers[0]:g}": f"{vanilla['mean']:.3f}+-{vanilla['std']:.3f}",
      }
    )
  return results.format_table(table, ["C"] + [f"s={s:g}" for s in config.noise_multipliers])


def plot(path: str, rows: list[dict], config: Config, notes: dict[str, str]) -> None:
  """Accuracy vs sigma (categorical axis, so sigma = 0 fits), a line per C, a panel per model."""
  from matplotlib import colormaps
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  model_names = [m for m in config.models if any(r["model"] == m for r in rows)]
  if not model_names:
    return
  fig = Figure(figsize=(5.2 * len(model_names), 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(model_names), squeeze=False)[0]
  sigmas = list(config.noise_multipliers)
  x_pos = np.arange(len(sigmas), dtype=np.float64)
  cmap = colormaps["plasma"]
  for ax, model in zip(axes, model_names, strict=True):
    mine = [r for r in rows if r["model"] == model]
    stats = results.mean_std(
      mine, by=("defense", "clip_norm", "noise_multiplier"), value="test_acc"
    )
    for ci, c in enumerate(config.clip_norms):
      pts = {
        results.canonical(s["noise_multiplier"]): s
        for s in stats
        if s["defense"] == "dp" and results.canonical(s["clip_norm"]) == results.canonical(c)
      }
      idx = [i for i, s in enumerate(sigmas) if results.canonical(s) in pts]
      if not idx:
        continue
      y = np.array([pts[results.canonical(sigmas[i])]["mean"] for i in idx])
      e = np.array([pts[results.canonical(sigmas[i])]["std"] for i in idx])
      ax.errorbar(
        x_pos[idx],
        y,
        yerr=e,
        marker="o",
        markersize=4,
        capsize=3,
        color=cmap(0.85 * ci / max(len(config.clip_norms) - 1, 1)),
        label=f"C={c:g}",
      )
    vanilla = [s for s in stats if s["defense"] == "vanilla"]
    if vanilla:
      v = vanilla[0]
      ax.axhline(v["mean"], color="k", linestyle="--", linewidth=1, label="vanilla SGD")
      ax.axhspan(v["mean"] - v["std"], v["mean"] + v["std"], color="k", alpha=0.08)
    dataset = mine[0]["dataset"]
    ax.set_title(
      f"{model.upper()} / {dataset}" + (" (stand-in)" if "INSTEAD" in notes.get(model, "") else "")
    )
    ax.set_xticks(x_pos, [f"{s:g}" for s in sigmas])
    ax.set_xlabel("noise multiplier sigma")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
  results.save_figure(fig, path, dpi=110)


def run(config: Config) -> dict:
  """Trains every selected model over the grid; writes utility.csv, utility.png, datasets.json."""
  _validate(config)
  out = common.prepare_out(config)
  csv_path = os.path.join(out, "utility.csv")
  notes, datasets, rows = {}, {}, []
  with common.Timer() as timer:
    for run_ in config.runs:
      if run_.model not in config.models:
        continue
      d, notes[run_.model] = load(config, run_)
      datasets[run_.model] = d["name"]
      print(notes[run_.model])
      rows = _run_model(config, run_, d, csv_path)
  results.write_json(os.path.join(out, "datasets.json"), notes)
  rows = _selected(rows, config, datasets)
  plot(os.path.join(out, "utility.png"), rows, config, notes)
  for model in config.models:
    print(f"\n{notes[model]}\ntest accuracy (mean +- std over {config.seeds} seeds):")
    print(accuracy_table(rows, model, config))
  eps_rows = sorted(
    {
      (r["model"], r["noise_multiplier"], r["epsilon"])
      for r in rows
      if r["defense"] == "dp" and r["noise_multiplier"] > 0
    }
  )
  print(
    f"\nepsilon (delta {config.delta:g}; {accounting.assumption(sampling=common.SAMPLING)}): "
    + "; ".join(f"{m} s={s:g}: {e:.3g}" for m, s, e in eps_rows)
  )
  print(f"wall time {timer.seconds:.1f} s; wrote {csv_path} and {out}/utility.png")
  return {"rows": rows, "notes": notes, "seconds": timer.seconds}


def main(argv):
  del argv
  fl = flags.FLAGS
  run(
    common.config_from_flags(
      PRESETS,
      {
        "models": tuple(fl.models or ()),
        "epochs": fl.epochs,
        "clip_norms": tuple(map(float, fl.clip_norms or ())),
        "noise_multipliers": tuple(map(float, fl.noise_multipliers or ())),
        "fallback": fl.fallback,
        "download": fl.download,
        "max_batch": fl.max_batch,
      },
    )
  )


def define_flags():
  common.define_common_flags()
  flags.DEFINE_list("models", None, f"Models, from {MODEL_NAMES}.")
  flags.DEFINE_integer("epochs", None, "Training epochs of every model (default: the preset's).")
  flags.DEFINE_list("clip_norms", None, "Clip norms C.")
  flags.DEFINE_list("noise_multipliers", None, "Noise multipliers sigma (0: clipping only).")
  flags.DEFINE_bool("fallback", None, "Use FashionMNIST where Purchase-100 / CIFAR-10 is missing.")
  flags.DEFINE_bool("download", None, "Let tensorflow-datasets download missing data.")
  flags.DEFINE_integer("max_batch", None, "Most jobs per compiled call (memory).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
