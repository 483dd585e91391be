"""One scenario's vmapped training sweep: every (setting, defense, seed) is a job of one
compiled program per defense kind, measuring gradients before every update."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from experiments import common
from experiments.gradient_analysis import crafting
from experiments.gradient_analysis import subset_grads
from experiments.gradient_analysis.config import COLUMNS
from experiments.gradient_analysis.config import LAYERS
from experiments.gradient_analysis.config import SCENARIO_SPECS
from experiments.gradient_analysis.config import Config
from experiments.gradient_analysis.config import defense_grid
from jaxshape import models
from jaxshape import poisons
from jaxshape import sweep
from jaxshape import train


def model_for(config: Config, scenario: str, num_classes: int):
  if SCENARIO_SPECS[scenario].model == "lr":
    return models.LR(num_classes)
  return models.MLP(num_classes, hidden=tuple(config.hidden))


def build_program(config: Config, scenario: str, num_classes: int):
  spec0 = SCENARIO_SPECS[scenario]
  model = model_for(config, scenario, num_classes)
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
        subset_grads.subset_batch_grads, loss_fn, config.measure, hparams.l2_norm_clip
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
      out = jax.vmap(subset_grads.epoch_artifacts)(records["batch_metrics"])
      out["test_acc"] = records["test_acc"]
      return out

    return program

  return build, epochs


def run_scenario(config: Config, scenario: str, d: dict[str, Any], init_S, csv_path: str):
  spec0 = SCENARIO_SPECS[scenario]
  with common.Timer() as craft_timer:
    px_V, py_V, index = crafting.craft(config, scenario, d)
  print(
    f"{scenario}: {px_V.shape[0]} poison variant(s) of up to {px_V.shape[1]} poisons "
    f"added to {d['x'].shape[0]} clean points, crafted in {craft_timer.seconds:.1f} s"
  )
  build, epochs = build_program(config, scenario, d["num_classes"])
  jobs = []
  for defense, clip, sigma, _ in defense_grid(config, scenario):
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
