"""What an indiscriminate run does: `Config`, presets, output columns, checks (§6.2)."""

from __future__ import annotations

import dataclasses

from experiments import common

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


def defenses(config: Config) -> list[common.Defense]:
  """The `common.Defense` (kind, clip norm, noise multiplier) of every row of the grid."""
  adaptive = config.adaptive_multipliers if config.adaptive else ()
  return common.defense_grid(
    True, config.clip_norms, config.noise_clip, config.noise_multipliers, adaptive
  )
