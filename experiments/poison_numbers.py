r"""Crafting throughput of the attacks, and Steinhardt vs label flipping on FashionMNIST-3/4.

Four measurements (wall times on whatever machine runs it; the first call of
each attack includes compilation, so each is timed twice and both reported):

  frogs       Poison Frogs poisons per second: an MLP 784-256-10 trained
              briefly on full FashionMNIST, one coat target, the 100 test
              dresses nearest it in feature space, 1,000 iterations.
  brew        Witches' Brew seconds per restart on the CNN (28x28x1, trained
              briefly on FashionMNIST): a budget of `brew_budget` training
              points of the attacker's class, `brew_steps` signed-Adam steps.
  steinhardt  Steinhardt et al.'s attack at 40% on FashionMNIST-3/4 (4,320
              poisons for 10,800 clean points): crafting time.
  rad         Test accuracy and RAD of a vanilla softmax regression (Adam lr
              0.01, batch 300, 40 epochs) trained on clean + 40% poisons of
              each attack, mean over seeds; RAD uses the best epoch (as the
              paper's code did) and the last.

Commands:
  python -m experiments.poison_numbers --preset=smoke   # a minute: tiny settings
  python -m experiments.poison_numbers --preset=quick   # the numbers of the report
  python -m experiments.poison_numbers --parts=rad --seeds=3

References:
  Hong et al. 2020, §6.2 (RAD of LF ~0.03 vs Steinhardt ~0.19 at 40%), §6.3
  (Poison Frogs setting). Shafahi et al. 2018; Geiping et al. 2021; Steinhardt,
  Koh & Liang 2017.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from experiments import common
from jaxshape import data
from jaxshape import models
from jaxshape import poisons
from jaxshape import results
from jaxshape import train

PARTS = ("frogs", "brew", "steinhardt", "rad")
DRESS, COAT, SHIRT = 3, 4, 6


@dataclasses.dataclass(frozen=True)
class Config:
  out: str | None = None
  data_dir: str | None = None
  parts: tuple[str, ...] = PARTS
  seeds: int = 3
  ratio: float = 0.4
  mlp_epochs: int = 2
  frogs_candidates: int = 100
  frogs_iters: int = 1000
  cnn_epochs: int = 1
  cnn_train: int = 60_000
  brew_budget: int = 100
  brew_steps: int = 240
  brew_restarts: int = 2
  steinhardt_iterations: int = 200
  epochs: int = 40
  max_train: int | None = None
  progress: bool = True


PRESETS = {
  "smoke": Config(
    seeds=1,
    mlp_epochs=1,
    frogs_candidates=10,
    frogs_iters=50,
    cnn_train=1000,
    brew_budget=10,
    brew_steps=8,
    steinhardt_iterations=12,
    epochs=2,
    max_train=1000,
  ),
  "quick": Config(),
  "paper": Config(brew_restarts=8),
}


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def _fit_params(spec, lr, x, y, key):
  fit = jax.jit(lambda k, d: train.fit(spec, train.HParams.create(lr), k, d).params)
  return fit(key, {"x": jnp.asarray(x), "y": jnp.asarray(y)})


def frogs_throughput(config: Config, fm: data.Dataset) -> dict:
  """Poison Frogs poisons per second on the MLP's features (100 candidates x 1,000 iterations)."""
  model = models.MLP(10)
  spec = train.TrainSpec(
    models.ClassifierLoss(model), "sgd", batch_size=100, epochs=config.mlp_epochs
  )
  params = _fit_params(spec, 0.08, fm.x_train, fm.y_train, jax.random.key(0))
  t = int(np.flatnonzero(fm.y_test == COAT)[0])
  idx_K, _ = poisons.nearest_candidates(
    model, params, fm.x_test[t], fm.x_test, fm.y_test, DRESS, config.frogs_candidates
  )

  def craft():
    return poisons.poison_frogs(
      model,
      params,
      fm.x_test[t],
      fm.x_test,
      fm.y_test,
      idx_K,
      target_idx=t,
      max_iters=config.frogs_iters,
      max_feature_distance=np.inf,
    ).x

  _, first = _timed(craft)
  _, second = _timed(craft)
  k = config.frogs_candidates
  return {
    "frogs_candidates": k,
    "frogs_iters": config.frogs_iters,
    "frogs_seconds_first": first,
    "frogs_seconds": second,
    "frogs_poisons_per_second": k / second,
    "mlp_test_acc": float(train.accuracy(model, params, fm.x_test, fm.y_test)),
  }


def brew_seconds(config: Config, fm: data.Dataset) -> dict:
  """Witches' Brew seconds per restart on the CNN (the first restart includes compilation)."""
  model = models.CNN(10)
  spec = train.TrainSpec(
    models.ClassifierLoss(model), "sgd", batch_size=100, epochs=config.cnn_epochs
  )
  n = config.cnn_train
  params = _fit_params(spec, 0.02, fm.x_train[:n], fm.y_train[:n], jax.random.key(1))
  t = int(np.flatnonzero(fm.y_test == SHIRT)[0])
  ps = poisons.witches_brew(
    jax.random.key(2),
    model,
    params,
    fm.x_test[t],
    COAT,
    fm.x_train,
    fm.y_train,
    budget=config.brew_budget,
    steps=config.brew_steps,
    restarts=config.brew_restarts,
    target_idx=t,
    progress=config.progress,
  )
  seconds_R = np.asarray(ps.info["seconds_R"])
  alignment_RS = np.asarray(ps.info["alignment_RS"])
  return {
    "brew_budget": config.brew_budget,
    "brew_steps": config.brew_steps,
    "brew_seconds_first_restart": float(seconds_R[0]),
    "brew_seconds_per_restart": float(seconds_R[1:].mean()) if len(seconds_R) > 1 else None,
    "brew_alignment_start": float(alignment_RS[:, 0].mean()),
    "brew_alignment_end": float(alignment_RS[:, -1].mean()),
    "cnn_test_acc": float(train.accuracy(model, params, fm.x_test, fm.y_test)),
  }


def _load_3_4(config: Config):
  ds = data.load("fashion_mnist_3_4", data_dir=config.data_dir)
  x, y = ds.x_train, ds.y_train
  if config.max_train:
    keep = np.random.default_rng(0).permutation(x.shape[0])[: config.max_train]
    x, y = x[keep], y[keep]
  return ds, x, y


def steinhardt_time(config: Config, x, y) -> tuple[dict, poisons.PoisonSet]:
  """Crafting time of Steinhardt et al.'s attack (first call compiles; the second does not)."""
  craft = lambda: poisons.steinhardt(x, y, config.ratio, iterations=config.steinhardt_iterations)
  ps, first = _timed(craft)
  ps, second = _timed(craft)
  f = poisons.feasibility(x, y, ps.x, ps.y)
  return {
    "steinhardt_poisons": len(ps),
    "steinhardt_seconds_first": first,
    "steinhardt_seconds": second,
    "steinhardt_label": int(ps.y[0]),
    "steinhardt_checkpoint": ps.config["selected_checkpoint"],
    "steinhardt_all_feasible": bool(jnp.all(f.feasible_P)),
    "steinhardt_max_sphere": float(f.sphere_P.max()),
    "steinhardt_max_slab": float(f.slab_P.max()),
  }, ps


def rad(config: Config, ds, x, y, stein: poisons.PoisonSet) -> dict:
  """Vanilla LR test accuracy on clean, clean + LF and clean + Steinhardt poisons, per seed."""
  model = models.LR(2)
  spec = train.TrainSpec(models.ClassifierLoss(model), "adam", batch_size=300, epochs=config.epochs)
  evaluate = train.evaluator(model, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
  hparams = train.HParams.create(0.01)

  @jax.jit
  def test_acc_E(key, d):
    return train.fit(spec, hparams, key, d, eval_fn=evaluate).records["test_acc"]

  rows = []
  for seed in range(config.seeds):
    key = jax.random.key(seed)
    flipped = poisons.label_flip(jax.random.key(1000 + seed), x, y, config.ratio)
    accs = {
      "clean": test_acc_E(key, {"x": jnp.asarray(x), "y": jnp.asarray(y)}),
      "label_flip": test_acc_E(key, poisons.merge((x, y), flipped)),
      "steinhardt": test_acc_E(key, poisons.merge((x, y), stein)),
    }
    clean_best, clean_final = float(accs["clean"].max()), float(accs["clean"][-1])
    for attack, acc_E in accs.items():
      best, final = float(acc_E.max()), float(acc_E[-1])
      rows.append(
        {
          "seed": seed,
          "attack": attack,
          "acc_best": best,
          "acc_final": final,
          "rad_best": (clean_best - best) / clean_best,
          "rad_final": (clean_final - final) / clean_final,
        }
      )
  out = {}
  for attack in ("clean", "label_flip", "steinhardt"):
    mine = [r for r in rows if r["attack"] == attack]
    for k in ("acc_best", "acc_final", "rad_best", "rad_final"):
      out[f"{attack}_{k}"] = float(np.mean([r[k] for r in mine]))
  out["rad_rows"] = rows
  return out


def run(config: Config) -> dict:
  """Runs the parts named in `config.parts`; returns (and prints) the numbers."""
  unknown = set(config.parts) - set(PARTS)
  if unknown:
    raise ValueError(f"parts must be among {PARTS}, got {sorted(unknown)}")
  numbers: dict = {"devices": str(jax.devices()), "cpu_count": os.cpu_count()}
  if {"frogs", "brew"} & set(config.parts):
    fm = data.load("fashion_mnist", data_dir=config.data_dir)
    if config.max_train:
      fm = dataclasses.replace(
        fm, x_train=fm.x_train[: config.max_train * 10], y_train=fm.y_train[: config.max_train * 10]
      )
    if "frogs" in config.parts:
      numbers.update(frogs_throughput(config, fm))
    if "brew" in config.parts:
      numbers.update(brew_seconds(config, fm))
  if {"steinhardt", "rad"} & set(config.parts):
    ds, x, y = _load_3_4(config)
    stein_numbers, stein = steinhardt_time(config, x, y)
    numbers.update(stein_numbers)
    if "rad" in config.parts:
      numbers.update(rad(config, ds, x, y, stein))
  for k, v in numbers.items():
    if k != "rad_rows":
      print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
  if config.out:
    os.makedirs(config.out, exist_ok=True)
    results.write_json(os.path.join(config.out, "poison_numbers.json"), numbers)
  return numbers


def main(argv):
  del argv
  fl = flags.FLAGS
  config = common.config_from_flags(
    PRESETS,
    {"parts": tuple(fl.parts), "brew_budget": fl.brew_budget, "brew_steps": fl.brew_steps},
  )
  run(config)


if __name__ == "__main__":
  common.define_common_flags()
  flags.DEFINE_list("parts", list(PARTS), f"Which measurements, among {PARTS}.")
  flags.DEFINE_integer("brew_budget", 100, "Witches' Brew poisons (training points perturbed).")
  flags.DEFINE_integer("brew_steps", 240, "Witches' Brew signed-Adam steps per restart.")
  app.run(main)
