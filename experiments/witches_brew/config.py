"""What a Witches' Brew run does: `Config`, its presets, flag help and checks."""

from __future__ import annotations

import dataclasses

from experiments import common


@dataclasses.dataclass(frozen=True)
class Config:
  out: str = "runs/witches_brew"
  data_dir: str | None = None
  seeds: int = 2  # victim seeds (initialisation, shuffling, DP noise)
  progress: bool = True
  targets: int = 8
  # Targets whose mean surrogate margin logit(adversarial) - logit(true) lies in this open
  # interval (correct on every surrogate, but confusable); () takes them at random. Victims'
  # margins scatter about +-5 logits around the surrogates' (RESULTS.md).
  target_margin: tuple[float, ...] = (-8.0, -3.0)
  target_class: int = 0  # FashionMNIST T-shirt/top: the most confusable pair (RESULTS.md)
  adversarial_class: int = 6  # shirt: the poisons are shirts and keep their label
  # Victims train on a fixed random subset of the clean set, long enough to fit it (40 epochs):
  # against victims stopped at 8 epochs of 3,000 points the poisons changed nothing (RESULTS.md).
  max_train: int = 1_000
  max_test: int = 2_000  # clean accuracy on a fixed random subset of the test set
  surrogate_epochs: int = 40  # the attacker's pre-trained models
  surrogate_seeds: int = 2  # models trained like the victims from other keys (an ensemble)
  # Craft against the surrogate's parameters after these epochs (an ensemble along its
  # training); () crafts against its final parameters only.
  surrogate_checkpoints: tuple[int, ...] = ()
  epochs: int = 40  # victims, trained from scratch
  victim_augment: bool = False  # flips and --max_shift shifts of every batch (surrogates too)
  batch_size: int = 100
  learning_rate: float = 0.05
  momentum: float = 0.9
  budget: float = 0.01  # poisons as a fraction of the training set
  # "nearest": the training points of adversarial_class nearest the target in the surrogates'
  # penultimate space; "random": a random draw of them (Geiping et al.).
  base_selection: str = "nearest"
  epsilon: float = 16 / 255
  steps: int = 240  # signed-Adam steps per restart
  restarts: int = 1
  augment: bool = True  # differentiable flips and shifts while crafting
  max_shift: int = 2
  include_vanilla: bool = True
  clip_norms: tuple[float, ...] = ()
  noise_clip: float = 1.0
  noise_multipliers: tuple[float, ...] = (0.01, 0.1)


HELP = {
  "out": "Output folder (CSV, config.json, poisons, PNG).",
  "data_dir": "Folder with the FashionMNIST files (see README: Getting data).",
  "seeds": "Victim seeds per defense (initialisation, batches and DP noise).",
  "progress": "Show progress bars.",
  "targets": "Targets: test points of --target_class every surrogate classifies correctly.",
  "target_margin": "Targets' mean surrogate margin lies in (lo, hi); empty: random targets.",
  "target_class": "Class of the targets (0: T-shirt/top).",
  "adversarial_class": "The class the target should get; the poisons' clean class (6: shirt).",
  "max_train": "Victims and surrogate train on a fixed random subset of this many points.",
  "max_test": "Clean accuracy on a fixed random subset of the test set.",
  "surrogate_epochs": "Epochs of the attacker's pre-trained models.",
  "surrogate_seeds": "Surrogates trained from different keys; crafting uses all (ensemble).",
  "surrogate_checkpoints": "Craft against the surrogate after these epochs (ensemble).",
  "epochs": "Epochs of each victim, trained from scratch on the poisoned set.",
  "victim_augment": "Augment victims' (and surrogates') batches: flips, --max_shift shifts.",
  "batch_size": "Batch size (surrogate and victims).",
  "learning_rate": "SGD learning rate (surrogate and victims).",
  "momentum": "SGD momentum (surrogate and victims).",
  "budget": "Poisons as a fraction of the training set (Geiping et al.: 1% or less).",
  "base_selection": "Poison bases: 'nearest' the target in surrogate features, or 'random'.",
  "epsilon": "l-infinity bound of the perturbation (16/255).",
  "steps": "Signed-Adam crafting steps per restart.",
  "restarts": "Crafting restarts (the lowest alignment loss wins).",
  "augment": "Differentiable flips and shifts of the poisons while crafting.",
  "max_shift": "Largest shift (pixels) of the crafting augmentation.",
  "include_vanilla": "Include undefended victims.",
  "clip_norms": "Clip norms of clipping-only victims (sigma = 0).",
  "noise_clip": "Clip norm C of the DP victims.",
  "noise_multipliers": "Noise multipliers sigma of the DP victims (with C = --noise_clip).",
}

RULES = {
  "seeds": (1, None),
  "targets": (1, None),
  "target_class": (0, 9),
  "adversarial_class": (0, 9),
  "max_train": (100, 60_000),
  "max_test": (1, 10_000),
  "target_margin": (None, None),
  "surrogate_epochs": (1, None),
  "surrogate_seeds": (1, None),
  "surrogate_checkpoints": (1, None),
  "epochs": (1, None),
  "batch_size": (1, None),
  "learning_rate": (0, None, "open"),
  "momentum": (0, 1),
  "budget": (0, 1, "open"),
  "base_selection": ("nearest", "random"),
  "epsilon": (0, 1, "open"),
  "steps": (1, None),
  "restarts": (1, None),
  "max_shift": (0, 13),
  "clip_norms": (0, None, "open"),
  "noise_clip": (0, None, "open"),
  "noise_multipliers": (0, None),
}

SMOKE = Config(
  out="runs/witches_brew_smoke",
  seeds=1,
  targets=2,
  max_train=400,
  max_test=200,
  surrogate_epochs=1,
  surrogate_seeds=1,
  target_margin=(),
  epochs=1,
  budget=0.02,
  steps=4,
  noise_multipliers=(0.1,),
)

PRESETS = {
  "smoke": SMOKE,
  "quick": Config(),
  "paper": Config(targets=40, seeds=3, max_train=5_000, restarts=4),
}


def defenses(config: Config) -> list[common.Defense]:
  return common.defense_grid(
    config.include_vanilla, config.clip_norms, config.noise_clip, config.noise_multipliers
  )


def n_poisons(config: Config) -> int:
  """The budget in points: round(budget x training-set size), at least one."""
  return max(1, round(config.budget * config.max_train))


def validate(config: Config) -> Config:
  """Checks every field (ValueError naming the flag and its range)."""
  common.check_config(config, RULES)
  if config.target_class == config.adversarial_class:
    raise ValueError(
      f"--target_class and --adversarial_class must differ, both {config.target_class}"
    )
  lohi = config.target_margin
  if lohi and (len(lohi) != 2 or not lohi[0] < lohi[1]):
    raise ValueError(f"--target_margin must be empty or two numbers lo < hi, got {lohi}")
  if any(e > config.surrogate_epochs for e in config.surrogate_checkpoints):
    raise ValueError("--surrogate_checkpoints must be epochs <= --surrogate_epochs")
  if not defenses(config):
    raise ValueError("no defense to evaluate: give --include_vanilla or a defense grid")
  if not config.out:
    raise ValueError("--out must name a folder")
  return config
