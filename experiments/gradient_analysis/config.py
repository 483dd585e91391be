"""What a gradient-analysis run does: scenarios, `Config`, presets, columns, checks (§3, §6.2)."""

from __future__ import annotations

import dataclasses
import os

from experiments import common
from jaxshape import results

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


def validate(config: Config) -> None:
  """Checks scenarios, defenses and every range (ValueError naming the flag), and that `out`
  holds no gradients measured the other way."""
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
