"""The indiscriminate part: every mechanism against label flipping and Steinhardt et al.'s attack.

§6.2's setting (softmax regression on FashionMNIST-3/4, Adam lr 0.01, batch
300, 40 epochs from scratch, poisons added at each ratio) with the poisons of
`experiments.indiscriminate.crafting`. Every (attack, ratio, mechanism point,
seed) and the clean run of each (mechanism point, seed) is one job of a
`jaxshape.sweep` (one compiled program per `train` defense kind), naming its
training set by row index into one shared pool of clean points and poisons, as
`experiments.indiscriminate` does. The detector's filter-then-retrain is the
vanilla program with a mask: each job carries a row of detector scores (of the
checkpoint trained `detect_epochs` vanilla epochs on its own training set) and
a threshold, and examples scored above it are left out.

References:
  Hong et al. 2020, §6.2, §7; Steinhardt, Koh & Liang 2017.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.indiscriminate import crafting
from experiments.shaping import detection
from experiments.shaping.config import AUC_COLUMNS
from experiments.shaping.config import MECHANISM_FIELDS
from experiments.shaping.config import Config
from experiments.shaping.config import by_cost
from experiments.shaping.config import mechanism_ident
from experiments.shaping.config import mechanisms
from jaxshape import detect
from jaxshape import models
from jaxshape import results
from jaxshape import sweep
from jaxshape import train

CLEAN = "clean"  # the `attack` of the runs without poisons (each mechanism's reference)
RUN_COLUMNS = (
  "attack",
  "poison_ratio",
  "n_poisons",
  *MECHANISM_FIELDS,
  "seed",
  "acc_best",
  "acc_final",
  "n_removed",
  "n_poison_removed",
)


def _spec(config: Config, model, kind: str, epochs: int) -> train.TrainSpec:
  return train.TrainSpec(
    models.ClassifierLoss(model),
    optimizer="adam",
    defense=kind,
    batch_size=config.batch_size,
    epochs=epochs,
  )


def _fit_data(pool_x, pool_y, n_clean: int, p_max: int, variant, n_poisons):
  """The training set of a job as rows of the pool: the clean points, then the variant's
  first `n_poisons` poisons (the rest masked). Traceable in `variant` and `n_poisons`."""
  rows_P = n_clean + variant * p_max + jnp.arange(p_max)
  active_P = (jnp.arange(p_max) < n_poisons).astype(jnp.float32)
  return {
    "x": pool_x,
    "y": pool_y,
    "index": jnp.concatenate([jnp.arange(n_clean), rows_P]),
    "mask": jnp.concatenate([jnp.ones([n_clean]), active_P]),
  }


def build_program(config: Config, model, n_clean: int, p_max: int):
  """`build(defense_kind)` -> the program `sweep.run` vmaps over jobs."""

  def build(kind: str):
    spec = _spec(config, model, kind, config.epochs)

    def program(values, key, shared):
      data = _fit_data(
        shared["pool_x"],
        shared["pool_y"],
        n_clean,
        p_max,
        values["variant"].astype(jnp.int32),
        values["n_poisons"],
      )
      score_R = shared["score_CR"][values["score_row"].astype(jnp.int32)]
      keep_R = (score_R <= values["threshold"]).astype(jnp.float32)
      present_R = data["mask"]
      data["mask"] = present_R * keep_R

      def eval_fn(params):
        return {"test_acc": train.accuracy(model, params, shared["x_test"], shared["y_test"])}

      hp = train.HParams.create(
        values["learning_rate"],
        values["l2_norm_clip"],
        values["noise_multiplier"],
        values["shaping_param"],
      )
      records = train.fit(spec, hp, key, data, eval_fn=eval_fn).records
      removed_R = present_R * (1.0 - keep_R)
      return {
        "test_acc": records["test_acc"],
        "n_removed": jnp.sum(removed_R),
        "n_poison_removed": jnp.sum(removed_R[n_clean:]),
      }

    return program

  return build


def _checkpoint_scores(config, model, shared, n_clean, p_max, num_classes, cache, job):
  """Detector scores of one training set (clean + its active poisons) at a checkpoint
  trained vanilla for `detect_epochs` on it; `[n_clean + p_max]` per detector (0 past the
  active poisons)."""
  attack, ratio, seed, variant, count = job
  key = {
    "attack": attack,
    "poison_ratio": ratio,
    "seed": seed,
    **{
      f: getattr(config, f)
      for f in (
        "dataset",
        "max_train",
        "steinhardt_iterations",
        "detect_epochs",
        "batch_size",
        "learning_rate",
      )
    },
  }

  def compute():
    data = _fit_data(shared["pool_x"], shared["pool_y"], n_clean, p_max, variant, count)
    spec = _spec(config, model, "vanilla", config.detect_epochs)
    hp = train.HParams.create(config.learning_rate)
    params = _fit(spec, hp, jax.random.fold_in(jax.random.key(seed), 7), data)[0]
    rows = np.concatenate([np.arange(n_clean), n_clean + variant * p_max + np.arange(count)])
    got = detection.scores(
      model, params, shared["pool_x"][rows], shared["pool_y"][rows], num_classes
    )
    pad = np.zeros(p_max - count)
    return {k: np.concatenate([v, pad]) for k, v in got.items()}

  name = f"detect_{attack}_{ratio:g}_seed{seed}"
  return detection.cached_scores(cache, name, key, compute)


_fit = jax.jit(train.fit, static_argnums=0)


def run_part(config: Config, out: str, cache: common.ParamsCache) -> dict:
  """Crafts, scores, trains the grid; returns the job rows (runs.csv) and detector rows."""
  ds, x, y = crafting.load(config)
  n = x.shape[0]
  crafted = {}
  for attack in config.attacks:
    with common.Timer() as t:
      crafted[attack] = crafting.craft(config, attack, x, y, ds.num_classes)
    print(f"{attack}: crafted {crafted[attack][0].shape[0]} poison variant(s) in {t.seconds:.1f} s")
  offsets, offset = {}, 0
  for attack in config.attacks:
    offsets[attack] = offset
    offset += crafted[attack][0].shape[0]
  px_V = np.concatenate([crafted[a][0] for a in config.attacks])
  py_V = np.concatenate([crafted[a][1] for a in config.attacks])
  p_max = px_V.shape[1]
  shared = {
    "pool_x": np.concatenate([x, px_V.reshape(-1, *x.shape[1:])]),
    "pool_y": np.concatenate([y, py_V.reshape(-1)]),
    "x_test": np.asarray(ds.x_test, np.float32),
    "y_test": np.asarray(ds.y_test, np.int32),
  }
  # The training sets: (attack, ratio, seed, pool variant, poison count); clean ones first.
  sets = [(CLEAN, 0.0, s, 0, 0) for s in range(config.seeds)]
  for attack in config.attacks:
    for (ratio, seed), (variant, count) in sorted(crafted[attack][2].items()):
      sets.append((attack, ratio, seed, offsets[attack] + variant, count))
  model = models.LR(ds.num_classes)
  score_CR, detect_rows = [], []
  with common.Timer() as t:
    for job in sets:
      got = _checkpoint_scores(config, model, shared, n, p_max, ds.num_classes, cache, job)
      score_CR.append(got[config.filter_score])
      count = job[4]
      is_poison = np.arange(n + count) >= n
      real = {k: v[: n + count] for k, v in got.items()}
      detect_rows.append(
        {
          "attack": job[0],
          "poison_ratio": job[1],
          "n_poisons": count,
          "seed": job[2],
          **detection.aucs(real, is_poison),
          "precision_at_k": detect.precision_at_k(real[config.filter_score], is_poison)
          if count
          else math.nan,
        }
      )
  print(f"detector: {len(sets)} checkpoints scored in {t.seconds:.1f} s")
  shared["score_CR"] = np.stack(score_CR).astype(np.float32)

  jobs = []
  for c, (attack, ratio, seed, variant, count) in enumerate(sets):
    scores_real = shared["score_CR"][c, : n + count]
    for mech in mechanisms(config):
      d = mech.defense
      values = {
        "variant": variant,
        "n_poisons": count,
        "learning_rate": config.learning_rate,
        "l2_norm_clip": d.clip_norm,
        "noise_multiplier": d.noise_multiplier,
        "shaping_param": d.shaping_param,
        "score_row": c,
        "threshold": detection.threshold(scores_real, mech.filter_fraction)
        if mech.name == "filter"
        else math.inf,
      }
      key = {"attack": attack, "poison_ratio": ratio, **mech.fields(), "seed": seed}
      jobs.append(sweep.Job(d.kind, values, seed, key))

  def to_rows(job, outputs):
    acc_E = np.asarray(outputs["test_acc"], np.float64)
    return [
      {
        **job.key,
        "n_poisons": int(job.values["n_poisons"]),
        "acc_best": float(acc_E.max()),
        "acc_final": float(acc_E[-1]),
        "n_removed": int(round(float(outputs["n_removed"]))),
        "n_poison_removed": int(round(float(outputs["n_poison_removed"]))),
      }
    ]

  rows = sweep.run(
    build_program(config, model, n, p_max),
    by_cost(jobs),
    os.path.join(out, "indiscriminate_runs.csv"),
    to_rows=to_rows,
    columns=RUN_COLUMNS,
    max_batch=config.max_batch,
    progress=config.progress,
    desc="shaping indiscriminate",
    shared=shared,
  )
  return {"runs": rows, "detect": detect_rows, "n_clean": n}


def result_rows(config: Config, runs: list[dict], detect_rows: list[dict]) -> list[dict]:
  """results.csv rows: RAD (best epoch) against the same mechanism's clean run, the cost
  against vanilla's clean run (same seed), and the detector's AUCs for the filter rows."""
  ident = mechanism_ident
  clean = {(ident(r), r["seed"]): r for r in runs if r["attack"] == CLEAN}
  vanilla = {r["seed"]: r for r in runs if r["attack"] == CLEAN and r["mechanism"] == "vanilla"}
  aucs = {(r["attack"], r["poison_ratio"], r["seed"]): r for r in detect_rows}
  labels = {ident(m.fields()): m.label for m in mechanisms(config)}
  out = []
  ratios = {results.canonical(x) for x in config.poison_ratios}
  for r in runs:
    if r["attack"] == CLEAN or (ident(r), r["seed"]) not in clean:
      continue
    if ident(r) not in labels or r["attack"] not in config.attacks or r["seed"] >= config.seeds:
      continue  # rows of an earlier run with a larger grid
    if results.canonical(r["poison_ratio"]) not in ratios:
      continue
    ref = clean[ident(r), r["seed"]]["acc_best"]
    base = vanilla[r["seed"]]["acc_best"] if r["seed"] in vanilla else math.nan
    row = {
      **{k: r[k] for k in ("attack", "poison_ratio", "n_poisons", *MECHANISM_FIELDS, "seed")},
      "label": labels.get(ident(r), r["mechanism"]),
      "metric_name": "rad_best",
      "metric": (ref - r["acc_best"]) / ref,
      "acc": r["acc_best"],
      "clean_acc": ref,
      "cost": 100.0 * (base - ref),
      "n_removed": r["n_removed"],
      "n_poison_removed": r["n_poison_removed"],
    }
    if r["mechanism"] == "filter":
      d = aucs.get((r["attack"], r["poison_ratio"], r["seed"]), {})
      row.update({k: d.get(k) for k in AUC_COLUMNS})
    out.append(row)
  return out
