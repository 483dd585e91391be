"""The adaptive-noise experiment's config, presets, output columns and its targeted run."""

from __future__ import annotations

import dataclasses
import os

from experiments import targeted


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
