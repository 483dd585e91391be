r"""Gradients of poisons vs clean samples during training (paper §3, Fig. 1; §6.2, Fig. 4c/4f).

Shapes: N clean training examples, P poisons (padded), V poison variants, S
seeds, E epochs, B batch.

Five scenarios (`--scenario`, a list), each trained vanilla and with DP
(`--defense=vanilla,dp`; every DP row is one (C, sigma) of `--clip_norm` x
`--noise_multiplier`, default C = 4, sigma = 0, i.e. clipping only):

  collision_scratch  softmax regression (LR) on FashionMNIST-3/4 + 100
                     watermark poisons (a dress overlaid with a coat at alpha,
                     labelled dress); Adam, 40 epochs, batch 300, lr 0.01;
                     setting = alpha in {0.1, 0.2, 0.4, 0.6, 0.8, 1.0}.
  collision_retrain  MLP with two hidden layers of 256 (`--hidden`; the
                     paper's code, not its Table 4) pre-trained on all of
                     FashionMNIST (10 classes; plain SGD, lr 0.04, batch 100,
                     20 epochs, `--pretrain_epochs`; once per seed, cached in
                     `--out`; 0.879-0.884 test accuracy on 3 seeds),
                     re-trained on the 60,000 training points + the same
                     kind of 100 poisons (dress, class 3, overlaid with coat,
                     class 4); SGD, 20 epochs, batch 100, lr 0.04; setting =
                     alpha.
  insertion          the same pre-trained MLP re-trained with 1% patched
                     copies of random training points (white square in the
                     top-left corner, labelled coat = 4); SGD, 20 epochs,
                     batch 100, lr 0.01; setting = patch size in {1, 4, 7, 10, 14}.
  label_flip,        LR on FashionMNIST-3/4 with poisons *added* at
  steinhardt         `--poison_ratios` (default 40%: 4,320 poisons) of random
                     label flipping / Steinhardt et al.'s attack; Adam as in
                     §6.2; setting = poison ratio (Fig. 4c/4f).

Measurement (PROTOCOL.md, "Gradient artifacts"): before every update, the
mean gradient of the batch's clean examples and that of its poisons are taken
at the current parameters; each is averaged over the epoch's batches that
hold at least one example of its kind (a batch without poisons does not pull
the poison mean toward zero); then the magnitude ratio ||g_poison|| /
||g_clean|| and the cosine are computed for the whole model (`layer=all`) and
for the last dense layer's kernel (`layer=last`, the paper code's view). By
default (`--measure=raw`) the gradients are the unclipped ones the data ask
for; `--measure=clipped` averages per-example gradients clipped at the row's C
(what DP training actually sums; vanilla rows are unchanged).

Reading the numbers: once training has settled, an epoch's summed gradient
nearly vanishes, N_clean g_clean + N_poison g_poison ~ 0, so the ratio tends
to N_clean / N_poison and the cosine to -1 whatever the attack (2.5 at 40%
poisons, 108 for 100 poisons among 10,800, 600 and 100 in the re-training
scenarios). The quick runs sit there (LF and Steinhardt 2.50, cosine -1.00).
What departs from it is the informative part: poisons the model absorbs
without conflict (insertion with patches of 4 pixels or more: the ratio falls
from about 120 to 20, the cosine from -0.8 to -0.2 over 20 epochs), and DP
rows measured raw, whose equilibrium is that of the clipped sums (measured
`clipped` they return to 2.50 and -1.00).

Every (setting, defense, seed) of a scenario is one job of a vmapped sweep
(`jaxshape.sweep.run`, resumable): poison sets are crafted per (setting,
seed) up front and indexed inside the program, padded and masked to the
largest count where counts differ. Outputs in `--out`:
  gradients.csv  one row per job x epoch x layer: `scenario, setting, defense,
                 clip_norm, noise_multiplier, seed, epoch, layer, clean_norm,
                 poison_norm, ratio, cosine, test_acc` (vanilla: clip_norm inf).
  gradients.png  ratio (log scale) and cosine vs epoch per scenario, one line
                 per setting (colour) and defense (line style), mean +- std
                 over seeds, for both layer views (Fig. 1, Fig. 4c/4f).
  cache/             the pre-trained MLPs (re-used by a rerun).
and prints mean-over-epochs ratio and cosine per scenario x setting x defense.

Commands:
  python -m experiments.gradient_analysis --preset=smoke --out=runs/gradients_smoke
  python -m experiments.gradient_analysis --preset=quick --out=runs/gradients
  python -m experiments.gradient_analysis --preset=quick --scenario=label_flip,steinhardt \
      --out=runs/gradients
  python -m experiments.gradient_analysis --preset=paper --out=runs/gradients_paper

The quick preset is the paper's setup with 3 seeds (paper: 5). Without
the `jaxshape.per_example` engine (DP-SGD on the 256-256 MLP through `vmap(grad)`, about
0.5 s a step on two CPU cores) pass `--retrain_defenses=vanilla`.

References:
  Hong et al. 2020, §3.1-§3.3 (Fig. 1, Fig. 2), §6.2 ("Impact on the
  Gradients", Fig. 4c/4f: LF ratio 2.527 vanilla vs 2.221 DP; Steinhardt
  2.497 vs 3.645).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

import jaxshape
from experiments import common
from jaxshape import analysis
from jaxshape import models
from jaxshape import poisons
from jaxshape import results
from jaxshape import sweep
from jaxshape import train

SCENARIOS = ("collision_scratch", "collision_retrain", "insertion", "label_flip", "steinhardt")
DEFENSE_NAMES = ("vanilla", "dp")
MEASURES = ("raw", "clipped")
LAYERS = ("all", "last")
PAPER_ALPHAS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
PAPER_PATCH_SIZES = (1, 4, 7, 10, 14)

COLUMNS = (
  "scenario",
  "setting",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "epoch",
  "layer",
  "clean_norm",
  "poison_norm",
  "ratio",
  "cosine",
  "test_acc",
)

# Salts folded into a seed's key, so crafting and pre-training draw bits
# independent of the training run (whose key is `jax.random.key(seed)`).
_CRAFT_SALT = 1
_PRETRAIN_SALT = 2


@dataclasses.dataclass(frozen=True)
class Scenario:
  """The fixed setup of one scenario (the paper's; `Config` scales it)."""

  dataset: str
  model: str  # "lr" or "mlp"
  optimizer: str
  learning_rate: float
  batch_size: int
  epochs: int
  setting_name: str
  retrain: bool  # fine-tune the pre-trained MLP instead of training from scratch


SCENARIO_SPECS = {
  "collision_scratch": Scenario("fashion_mnist_3_4", "lr", "adam", 0.01, 300, 40, "alpha", False),
  "collision_retrain": Scenario("fashion_mnist", "mlp", "sgd", 0.04, 100, 20, "alpha", True),
  "insertion": Scenario("fashion_mnist", "mlp", "sgd", 0.01, 100, 20, "patch size", True),
  "label_flip": Scenario("fashion_mnist_3_4", "lr", "adam", 0.01, 300, 40, "poison ratio", False),
  "steinhardt": Scenario("fashion_mnist_3_4", "lr", "adam", 0.01, 300, 40, "poison ratio", False),
}

# Classes of the collision (base: dress, labelled dress; target: coat) and of the backdoor.
_COLLISION_CLASSES = {"fashion_mnist_3_4": (0, 1), "fashion_mnist": (3, 4)}
_INSERTION_TARGET = 4  # coat


@dataclasses.dataclass(frozen=True)
class Config:
  out: str = "runs/gradients"
  data_dir: str | None = None
  scenarios: tuple[str, ...] = SCENARIOS
  defenses: tuple[str, ...] = DEFENSE_NAMES
  retrain_defenses: tuple[str, ...] | None = None  # MLP re-training scenarios; None: `defenses`
  clip_norms: tuple[float, ...] = (4.0,)
  noise_multipliers: tuple[float, ...] = (0.0,)
  alphas: tuple[float, ...] = PAPER_ALPHAS
  patch_sizes: tuple[int, ...] = PAPER_PATCH_SIZES
  poison_ratios: tuple[float, ...] = (0.4,)
  num_collision_poisons: int = 100
  insertion_ratio: float = 0.01
  seeds: int = 3
  epochs: int | None = None  # None: each scenario's own (40 LR, 20 MLP)
  hidden: tuple[int, ...] = (256, 256)
  pretrain_epochs: int = 20
  pretrain_learning_rate: float = 0.04
  pretrain_batch_size: int = 100
  steinhardt_iterations: int = 200
  measure: str = "raw"
  max_train: int | None = None  # subsample every clean training set (smoke tests)
  max_test: int | None = None  # subsample every test set
  max_batch: int | None = 12  # most jobs per compiled call
  retrain_max_batch: int | None = 6  # the same for the MLP (each job copies the 60k images)
  progress: bool = True


PRESETS = {
  "smoke": Config(
    seeds=2,
    epochs=2,
    alphas=(1.0,),
    patch_sizes=(4,),
    poison_ratios=(0.2, 0.4),
    num_collision_poisons=10,
    insertion_ratio=0.05,
    hidden=(16, 16),
    pretrain_epochs=1,
    steinhardt_iterations=6,
    max_train=400,
    max_test=200,
    max_batch=None,
  ),
  "quick": Config(),
  "paper": Config(seeds=5),
}


# --- Grid ---------------------------------------------------------------------------------------


def defense_grid(config: Config, scenario: str) -> list[common.Defense]:
  """The `common.Defense` of every row of a scenario's grid: vanilla and/or every
  (clip norm, noise multiplier) pair."""
  names = config.defenses
  if SCENARIO_SPECS[scenario].retrain and config.retrain_defenses is not None:
    names = config.retrain_defenses
  grid = [common.VANILLA] if "vanilla" in names else []
  if "dp" in names:
    grid += [
      common.Defense("dp", float(c), float(s))
      for c in config.clip_norms
      for s in config.noise_multipliers
    ]
  return list(dict.fromkeys(grid))


def settings(config: Config, scenario: str) -> tuple:
  """The intensity values of a scenario: alphas, patch sizes or poison ratios."""
  if scenario in ("collision_scratch", "collision_retrain"):
    return tuple(float(a) for a in config.alphas)
  if scenario == "insertion":
    return tuple(int(s) for s in config.patch_sizes)
  return tuple(float(r) for r in config.poison_ratios)


RULES = {
  "measure": MEASURES,
  "clip_norms": (0, None, "open"),
  "noise_multipliers": (0, None),
  "alphas": (0, 1),
  "patch_sizes": (1, None),
  "poison_ratios": (0, 1),
  "num_collision_poisons": (1, None),
  "insertion_ratio": (0, 1),
  "seeds": (1, None),
  "epochs": (1, None),
  "hidden": (1, None),
  "pretrain_epochs": (1, None),
  "pretrain_learning_rate": (0, None, "open"),
  "pretrain_batch_size": (1, None),
  "steinhardt_iterations": (1, None),
  "max_train": (1, None),
  "max_test": (1, None),
  "max_batch": (1, None),
  "retrain_max_batch": (1, None),
}


def _validate(config: Config) -> None:
  for name in config.scenarios:
    if name not in SCENARIOS:
      raise ValueError(f"scenario must be among {SCENARIOS}, got {name!r}")
  for names in (config.defenses, config.retrain_defenses or ()):
    for name in names:
      if name not in DEFENSE_NAMES:
        raise ValueError(f"defense must be among {DEFENSE_NAMES}, got {name!r}")
  common.check_config(config, RULES)
  old = os.path.join(config.out, "config.json")
  if os.path.exists(os.path.join(config.out, "gradients.csv")) and os.path.exists(old):
    measured = results.read_json(old).get("measure", "raw")
    if measured != config.measure:
      raise ValueError(
        f"{config.out}/gradients.csv was measured with --measure={measured}; "
        f"use another --out for --measure={config.measure}"
      )


# --- Data, poisons, pre-training ----------------------------------------------------------------


def _load(config: Config, name: str) -> dict[str, Any]:
  ds = common.load_data(config, name)
  x, y = common.subsample(ds.x_train, ds.y_train, config.max_train, 0)
  x_test, y_test = common.subsample(ds.x_test, ds.y_test, config.max_test, 1)
  return {"x": x, "y": y, "x_test": x_test, "y_test": y_test, "num_classes": ds.num_classes}


def _pad(a: np.ndarray, size: int) -> np.ndarray:
  if a.shape[0] >= size:
    return a[:size]
  return np.concatenate([a, np.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)])


def _craft_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), _CRAFT_SALT)


def craft(config: Config, scenario: str, d: dict[str, Any]):
  """Poison variants `[V, P, ...]`, their labels `[V, P]`, and (setting, seed) -> (variant, count).

  Collision: 100 random (dress, coat) pairs per seed, overlaid at each alpha.
  Insertion: 1% random training points per seed, patched at each size (the
  same points for every size). Label flipping: the largest ratio's poisons
  per seed, a prefix of them for smaller ratios. Steinhardt: deterministic,
  crafted once per ratio.
  """
  x, y, num_classes = d["x"], d["y"], d["num_classes"]
  n = x.shape[0]
  xs, ys, index = [], [], {}

  def add(ps, setting, seeds):
    xs.append(np.asarray(ps.x, np.float32))
    ys.append(np.asarray(ps.y, np.int32))
    for seed in seeds:
      index[setting, seed] = (len(xs) - 1, len(ps))

  if scenario in ("collision_scratch", "collision_retrain"):
    base_class, target_class = _COLLISION_CLASSES[SCENARIO_SPECS[scenario].dataset]
    for seed in range(config.seeds):
      base_P, target_P = poisons.collision_pairs(
        _craft_key(seed),
        y,
        config.num_collision_poisons,
        base_class,
        target_class,
        num_classes=num_classes,
      )
      for alpha in settings(config, scenario):
        add(poisons.watermark(x, y, base_P, target_P, alpha), alpha, [seed])
  elif scenario == "insertion":
    for seed in range(config.seeds):
      for size in settings(config, scenario):
        ps = poisons.patch_backdoor(
          _craft_key(seed),
          x,
          y,
          config.insertion_ratio,
          _INSERTION_TARGET,
          size=size,
          num_classes=num_classes,
        )
        add(ps, size, [seed])
  elif scenario == "label_flip":
    ratios = settings(config, scenario)
    top = max(ratios)
    for seed in range(config.seeds):
      ps = poisons.label_flip(_craft_key(seed), x, y, top, num_classes=num_classes)
      xs.append(np.asarray(ps.x, np.float32))
      ys.append(np.asarray(ps.y, np.int32))
      for r in ratios:
        index[r, seed] = (len(xs) - 1, int(round(r * n)))
  elif scenario == "steinhardt":
    for r in settings(config, scenario):
      if int(round(r * n)) == 0:
        xs.append(np.zeros((1, *x.shape[1:]), np.float32))
        ys.append(np.zeros([1], np.int32))
        index.update({(r, seed): (len(xs) - 1, 0) for seed in range(config.seeds)})
        continue
      ps = poisons.steinhardt(x, y, r, iterations=config.steinhardt_iterations)
      add(ps, r, range(config.seeds))
  else:
    raise ValueError(f"scenario must be among {SCENARIOS}, got {scenario!r}")
  p_max = max(1, max(a.shape[0] for a in xs))
  px_V = np.stack([_pad(a, p_max) for a in xs])
  py_V = np.stack([_pad(a, p_max) for a in ys])
  return px_V, py_V, index


def _model(config: Config, scenario: str, num_classes: int):
  if SCENARIO_SPECS[scenario].model == "lr":
    return models.LR(num_classes)
  return models.MLP(num_classes, hidden=tuple(config.hidden))


def pretrain(config: Config, d: dict[str, Any]) -> tuple[Any, np.ndarray]:
  """MLPs trained on the clean (10-class) set, one per seed: (params `[S, ...]`, test acc `[S]`).

  Plain SGD (no momentum), batch `pretrain_batch_size`, `pretrain_learning_rate`,
  `pretrain_epochs`; the seeds run as one vmapped program. The result is cached in
  `<out>/cache/` (`common.ParamsCache`, keyed by these settings) and re-used by a rerun.
  """
  model = models.MLP(d["num_classes"], hidden=tuple(config.hidden))
  template = models.init_params(model, jax.random.key(0), d["x"].shape[1:])
  key = {
    "hidden": tuple(config.hidden),
    "epochs": config.pretrain_epochs,
    "learning_rate": config.pretrain_learning_rate,
    "batch_size": config.pretrain_batch_size,
    "n": int(d["x"].shape[0]),
    "max_train": config.max_train,
    "seeds": config.seeds,
  }
  spec = train.TrainSpec(
    models.ClassifierLoss(model),
    optimizer="sgd",
    defense="vanilla",
    batch_size=config.pretrain_batch_size,
    epochs=config.pretrain_epochs,
  )
  hparams = train.HParams.create(config.pretrain_learning_rate)

  def one(key, train_data, x_test, y_test):
    params = train.fit(spec, hparams, key, train_data).params
    return params, train.accuracy(model, params, x_test, y_test)

  def train_all():
    keys_S = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), _PRETRAIN_SALT))(
      jnp.arange(config.seeds)
    )
    with common.Timer() as timer:
      params_S, acc_S = jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))(
        keys_S, {"x": d["x"], "y": d["y"]}, d["x_test"], d["y_test"]
      )
      acc_S = np.asarray(acc_S)
    print(
      f"pre-trained {config.seeds} MLP(s) {tuple(config.hidden)} for {config.pretrain_epochs} "
      f"epochs in {timer.seconds:.1f} s; clean test accuracy {np.round(acc_S, 4).tolist()}"
    )
    return params_S, acc_S

  cache = common.ParamsCache(os.path.join(config.out, "cache"))
  params_S, acc_S = cache.get("pretrained_mlp", key, (template, 0), train_all)
  return params_S, np.asarray(acc_S)


# --- The measured training run ------------------------------------------------------------------


def subset_batch_grads(loss_fn, measure: str, l2_norm_clip, params, batch) -> dict[str, Any]:
  """A batch's mean clean and poison gradients, each zeroed (with its flag) when absent.

  Returns `{"clean": tree, "poison": tree, "has_clean": [], "has_poison": []}`:
  averaging every entry over an epoch's batches and dividing a mean tree by
  its flag's mean gives the mean over the batches that hold that subset.
  With `measure="clipped"`, each example's gradient is first clipped to
  `l2_norm_clip` (inf: no clipping).
  """
  if measure == "raw":
    means = analysis.subset_mean_grads(loss_fn, params, batch)
  else:
    # The clipped sum over a subset is the library's clipped sum with the
    # subset as the mask (its exact fast path where the model has one).
    mask_B = batch.get("mask", jnp.ones_like(batch["is_poison"]))
    means = {}
    for part, sel_B in (
      ("clean", (1.0 - batch["is_poison"]) * mask_B),
      ("poison", batch["is_poison"] * mask_B),
    ):
      clipped = jaxshape.clipped_sum_and_norms(
        loss_fn, params, {**batch, "mask": sel_B}, l2_norm_clip
      )
      count = jnp.maximum(jnp.sum(sel_B), 1.0)
      means[part] = jax.tree.map(lambda g, c=count: g / c, clipped.sum)
      means[f"n_{part}"] = jnp.sum(sel_B)
  has_clean = (means["n_clean"] > 0).astype(jnp.float32)
  has_poison = (means["n_poison"] > 0).astype(jnp.float32)
  return {
    "clean": jax.tree.map(lambda g: g * has_clean, means["clean"]),
    "poison": jax.tree.map(lambda g: g * has_poison, means["poison"]),
    "has_clean": has_clean,
    "has_poison": has_poison,
  }


def epoch_artifacts(epoch_means: dict[str, Any]) -> dict[str, jax.Array]:
  """`analysis.artifacts` of an epoch's averaged `subset_batch_grads` (PROTOCOL, §3).

  `epoch_means` is `train.fit`'s `batch_metrics` record of one epoch (the mean
  over its batches, accumulated in the scan carry; a sum works as well). Each
  subset's mean gradient is its tree divided by its flag, i.e. the mean over
  the batches that hold the subset; NaN when no batch did.
  """

  def mean(part):
    count = epoch_means[f"has_{part}"]
    scale = jnp.where(count > 0, 1.0 / jnp.where(count > 0, count, 1.0), jnp.nan)
    return jax.tree.map(lambda g: g * scale, epoch_means[part])

  return analysis.artifacts({"clean": mean("clean"), "poison": mean("poison")})


def _build(config: Config, scenario: str, num_classes: int):
  spec0 = SCENARIO_SPECS[scenario]
  model = _model(config, scenario, num_classes)
  loss_fn = models.ClassifierLoss(model)
  epochs = config.epochs if config.epochs is not None else spec0.epochs

  def build(group):
    _, defense = group
    spec = train.TrainSpec(
      loss_fn,
      optimizer=spec0.optimizer,
      defense=defense,
      batch_size=spec0.batch_size,
      epochs=epochs,
    )

    def program(values, key, shared):
      v = values["variant"].astype(jnp.int32)
      px, py = shared["px_V"][v], shared["py_V"][v]
      no_base = jnp.full(py.shape, -1, jnp.int32)
      poison_set = poisons.PoisonSet(px, py, "variant", no_base, no_base)
      # The clean set plus the variant's first `n_poisons` poisons (the rest masked out).
      fit_data = poisons.merge(
        {"x": shared["x"], "y": shared["y"]}, poison_set, num_active=values["n_poisons"]
      )
      init = None
      if spec0.retrain:
        s = values["seed_index"].astype(jnp.int32)
        init = jax.tree.map(lambda a: a[s], shared["init_S"])
      hparams = train.HParams.create(
        values["learning_rate"], values["l2_norm_clip"], values["noise_multiplier"]
      )
      batch_fn = functools.partial(
        subset_batch_grads, loss_fn, config.measure, hparams.l2_norm_clip
      )
      records = train.fit(
        spec,
        hparams,
        key,
        fit_data,
        init_params=init,
        eval_fn=train.evaluator(model, shared["x_test"], shared["y_test"]),
        batch_metrics_fn=batch_fn,
      ).records
      out = jax.vmap(epoch_artifacts)(records["batch_metrics"])
      out["test_acc"] = records["test_acc"]
      return out

    return program

  return build, epochs


def _run_scenario(config: Config, scenario: str, d: dict[str, Any], init_S, csv_path: str):
  spec0 = SCENARIO_SPECS[scenario]
  with common.Timer() as craft_timer:
    px_V, py_V, index = craft(config, scenario, d)
  print(
    f"{scenario}: {px_V.shape[0]} poison variant(s) of up to {px_V.shape[1]} poisons "
    f"added to {d['x'].shape[0]} clean points, crafted in {craft_timer.seconds:.1f} s"
  )
  build, epochs = _build(config, scenario, d["num_classes"])
  jobs = []
  for defense, clip, sigma in defense_grid(config, scenario):
    for (setting, seed), (variant, count) in index.items():
      values = {
        "variant": variant,
        "n_poisons": count,
        "seed_index": seed,
        "learning_rate": spec0.learning_rate,
        "l2_norm_clip": clip,
        "noise_multiplier": sigma,
      }
      key = {
        "scenario": scenario,
        "setting": setting,
        "defense": defense,
        "clip_norm": clip,
        "noise_multiplier": sigma,
        "seed": seed,
      }
      jobs.append(sweep.Job((scenario, defense), values, seed, key))
  shared = {
    "x": d["x"],
    "y": d["y"],
    "x_test": d["x_test"],
    "y_test": d["y_test"],
    "px_V": px_V,
    "py_V": py_V,
  }
  if init_S is not None:
    shared["init_S"] = init_S

  def to_rows(job, out):
    return [
      {
        **job.key,
        "epoch": e + 1,
        "layer": layer,
        "clean_norm": float(out[f"clean_norm_{layer}"][e]),
        "poison_norm": float(out[f"poison_norm_{layer}"][e]),
        "ratio": float(out[f"ratio_{layer}"][e]),
        "cosine": float(out[f"cosine_{layer}"][e]),
        "test_acc": float(out["test_acc"][e]),
      }
      for e in range(epochs)
      for layer in LAYERS
    ]

  max_batch = config.max_batch
  if spec0.retrain and config.retrain_max_batch is not None:
    max_batch = min(max_batch or config.retrain_max_batch, config.retrain_max_batch)
  with common.Timer() as timer:
    rows = sweep.run(
      build,
      jobs,
      csv_path,
      to_rows=to_rows,
      columns=COLUMNS,
      max_batch=max_batch,
      progress=config.progress,
      desc=f"gradients {scenario}",
      shared=shared,
    )
  print(f"{scenario}: {len(jobs)} jobs ({epochs} epochs each) in {timer.seconds:.1f} s")
  return rows


# --- Summary and plot ---------------------------------------------------------------------------


def _selected(rows: list[dict], config: Config) -> list[dict]:
  wanted = set()
  for scenario in config.scenarios:
    for defense, clip, sigma in defense_grid(config, scenario):
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
        for di, (defense, clip, sigma) in enumerate(grid):
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


# --- Entry points -------------------------------------------------------------------------------


def run(config: Config) -> dict:
  """Crafts, (pre-)trains and measures every selected scenario; writes CSV and PNG."""
  _validate(config)
  out = common.prepare_out(config)
  csv_path = os.path.join(out, "gradients.csv")
  loaded: dict[str, dict[str, Any]] = {}
  pretrained = None
  rows: list[dict] = []
  with common.Timer() as timer:
    for scenario in config.scenarios:
      spec0 = SCENARIO_SPECS[scenario]
      if spec0.dataset not in loaded:
        loaded[spec0.dataset] = _load(config, spec0.dataset)
      d = loaded[spec0.dataset]
      init_S = None
      if spec0.retrain:
        if pretrained is None:
          pretrained = pretrain(config, d)
        init_S = pretrained[0]
      rows = _run_scenario(config, scenario, d, init_S, csv_path)
  rows = _selected(rows, config)
  plot(os.path.join(out, "gradients.png"), rows, config)
  summary = summarize(rows)
  print(format_summary(summary))
  print(
    f"wall time {timer.seconds:.1f} s (measure={config.measure}); wrote {csv_path} and "
    f"{out}/gradients.png"
  )
  return {
    "rows": rows,
    "summary": summary,
    "seconds": timer.seconds,
    "pretrain_acc": None if pretrained is None else pretrained[1],
  }


def main(argv):
  del argv
  fl = flags.FLAGS
  config = common.config_from_flags(
    PRESETS,
    {
      "alphas": tuple(map(float, fl.alphas or ())),
      "patch_sizes": tuple(map(int, fl.patch_sizes or ())),
      "poison_ratios": tuple(map(float, fl.poison_ratios or ())),
      "epochs": fl.epochs,
      "pretrain_epochs": fl.pretrain_epochs,
      "measure": fl.measure,
      "max_batch": fl.max_batch,
      "hidden": tuple(map(int, fl.hidden or ())),
      "retrain_defenses": tuple(fl.retrain_defenses or ()),
    },
  )
  renamed = {
    "scenario": ("scenarios", str),
    "defense": ("defenses", str),
    "clip_norm": ("clip_norms", float),
    "noise_multiplier": ("noise_multipliers", float),
  }
  changes = {
    field: tuple(map(cast, fl[name].value))
    for name, (field, cast) in renamed.items()
    if fl[name].present
  }
  run(dataclasses.replace(config, **changes))


def define_flags():
  common.define_common_flags()
  flags.DEFINE_list("scenario", None, f"Scenarios, from {SCENARIOS}.")
  flags.DEFINE_list("defense", None, "vanilla, dp (DP rows: clip_norm x noise_multiplier).")
  flags.DEFINE_list("retrain_defenses", None, "Defenses of the MLP re-training scenarios.")
  flags.DEFINE_list("clip_norm", None, "DP clip norms C (default 4).")
  flags.DEFINE_list("noise_multiplier", None, "DP noise multipliers sigma (default 0).")
  flags.DEFINE_list("alphas", None, "Watermark intensities of the collision scenarios.")
  flags.DEFINE_list("patch_sizes", None, "Patch sizes of the insertion scenario.")
  flags.DEFINE_list("poison_ratios", None, "Poison ratios of label_flip / steinhardt.")
  flags.DEFINE_integer("epochs", None, "Training epochs of every scenario (default: each its own).")
  flags.DEFINE_integer("pretrain_epochs", None, "Pre-training epochs of the MLP.")
  flags.DEFINE_list("hidden", None, "Hidden layer sizes of the MLP (default 256,256).")
  flags.DEFINE_enum("measure", None, MEASURES, "raw or clipped per-example gradients.")
  flags.DEFINE_integer("max_batch", None, "Most jobs per compiled call (memory).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
