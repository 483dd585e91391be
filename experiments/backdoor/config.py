"""What a backdoor run does: `Config`, its presets, flag help and checks."""

from __future__ import annotations

import dataclasses

from experiments import common

ATTACKS = ("blend", "patch", "narcissus")
PROTOCOLS = ("direct", "finetune")
MODEL_NAMES = ("cnn", "small_cnn", "resnet18")


@dataclasses.dataclass(frozen=True)
class Config:
  out: str = "runs/backdoor"
  data_dir: str | None = None
  seeds: int = 3  # victim seeds (initialisation, shuffling, DP noise)
  progress: bool = True
  dataset: str = "fashion_mnist"
  model: str = "cnn"
  attacks: tuple[str, ...] = ("blend", "narcissus")
  protocol: str = "direct"
  target_class: int = 4  # FashionMNIST coat (Hong et al. §3.1's backdoor class)
  max_train: int = 2_000  # victims train on a fixed random subset of the clean set
  max_test: int = 1_000  # metrics on a fixed random subset of the test set
  epochs: int = 10  # direct: from scratch; finetune: fine-tuning epochs (4 left Blend 10% short)
  pretrain_epochs: int = 10  # finetune: clean pre-training (vanilla) before
  batch_size: int = 100
  learning_rate: float = 0.05
  momentum: float = 0.9
  blend_ratios: tuple[float, ...] = (0.01, 0.1)
  blend_lam: float = 0.2
  patch_ratios: tuple[float, ...] = (0.01,)
  patch_size: int = 4
  narcissus_ratios: tuple[float, ...] = (0.0005, 0.01, 0.02)
  epsilon: float = 16 / 255
  magnification: float = 3.0
  max_public: int = 3_000  # Narcissus POOD stand-in: other-class points outside the subset
  surrogate_epochs: int = 4
  warmup_steps: int = 15  # poi-warm-up: RAdam steps on the target class alone (0: none)
  warmup_lr: float = 0.01
  trigger_optimizer: str = "radam"
  trigger_steps: int = 2_000
  trigger_lr: float = 16 / 255 / 12  # Zeng et al.'s code: 0.01 on [-1, 1] inputs
  include_vanilla: bool = True
  clip_norms: tuple[float, ...] = ()
  noise_clip: float = 0.1
  noise_multipliers: tuple[float, ...] = (4.0,)
  dp_learning_rate: float = 0.5  # DP victims: clipped (C = 0.1) steps need a larger rate


HELP = {
  "out": "Output folder (CSV, config.json, caches, PNG).",
  "data_dir": "Folder with the data set files (see README: Getting data).",
  "seeds": "Victim seeds per configuration (initialisation, batches and DP noise).",
  "progress": "Show progress bars.",
  "dataset": "fashion_mnist or cifar10.",
  "model": "cnn (Hong et al. Table 4), small_cnn (limitations paper's SmallCNN), resnet18.",
  "attacks": "Backdoors to run: blend, patch, narcissus.",
  "protocol": "direct (train on the poisoned set from scratch) or finetune (clean pre-training).",
  "target_class": "The attacker's class (4: coat).",
  "max_train": "Victims train on a fixed random subset of this many clean points.",
  "max_test": "Metrics on a fixed random subset of the test split.",
  "epochs": "Epochs on the poisoned set (from scratch, or fine-tuning).",
  "pretrain_epochs": "finetune: epochs of clean vanilla pre-training.",
  "batch_size": "Batch size.",
  "learning_rate": "SGD learning rate of vanilla victims (and surrogate, pre-training).",
  "momentum": "SGD momentum.",
  "blend_ratios": "Blend poisons per clean training point (limitations paper: 1%, 10%).",
  "blend_lam": "Blend weight of the random-noise pattern (Chen et al.: 0.2).",
  "patch_ratios": "Patch (BadNets) poisons per clean training point.",
  "patch_size": "Side of the white square.",
  "narcissus_ratios": "Narcissus poisons per clean training point (0.05%, 1%, 2%).",
  "epsilon": "Narcissus l-inf budget (16/255).",
  "magnification": "Narcissus test-time trigger magnification (Zeng et al.: 3).",
  "max_public": "Narcissus: POOD stand-in size (other classes, outside the victims' subset).",
  "surrogate_epochs": "Narcissus: epochs of the surrogate on POOD + target-class points.",
  "warmup_steps": "Narcissus poi-warm-up: RAdam steps of the surrogate on the target class.",
  "warmup_lr": "Narcissus poi-warm-up: RAdam learning rate.",
  "trigger_optimizer": "Narcissus trigger optimiser: radam (Zeng et al.) or sign (PGD).",
  "trigger_steps": "Narcissus: optimiser steps of the trigger (batch 64).",
  "trigger_lr": "Narcissus: trigger step size (on [0, 1] inputs).",
  "include_vanilla": "Include undefended victims.",
  "clip_norms": "Clip norms of clipping-only victims (sigma = 0).",
  "noise_clip": "Clip norm C of the DP victims (limitations paper: 0.1).",
  "noise_multipliers": "Noise multipliers sigma of the DP victims (limitations paper: 4).",
  "dp_learning_rate": "SGD learning rate of the clipped / DP victims.",
}

RULES = {
  "seeds": (1, None),
  "dataset": ("fashion_mnist", "cifar10"),
  "model": MODEL_NAMES,
  "attacks": ATTACKS,
  "protocol": PROTOCOLS,
  "target_class": (0, 9),
  "max_train": (100, 60_000),
  "max_test": (10, 10_000),
  "epochs": (1, None),
  "pretrain_epochs": (1, None),
  "batch_size": (1, None),
  "learning_rate": (0, None, "open"),
  "momentum": (0, 1),
  "blend_ratios": (0, 1, "open"),
  "blend_lam": (0, 1, "open"),
  "patch_ratios": (0, 1, "open"),
  "patch_size": (1, 28),
  "narcissus_ratios": (0, 1, "open"),
  "epsilon": (0, 1, "open"),
  "magnification": (0, None),
  "max_public": (10, 60_000),
  "surrogate_epochs": (1, None),
  "warmup_steps": (0, None),
  "warmup_lr": (0, None, "open"),
  "trigger_optimizer": ("radam", "sign"),
  "trigger_steps": (1, None),
  "trigger_lr": (0, None, "open"),
  "clip_norms": (0, None, "open"),
  "noise_clip": (0, None, "open"),
  "noise_multipliers": (0, None),
  "dp_learning_rate": (0, None, "open"),
}

SMOKE = Config(
  out="runs/backdoor_smoke",
  seeds=1,
  attacks=ATTACKS,
  max_train=300,
  max_test=100,
  epochs=1,
  pretrain_epochs=1,
  blend_ratios=(0.1,),
  patch_ratios=(0.05,),
  narcissus_ratios=(0.02,),
  max_public=200,
  surrogate_epochs=1,
  warmup_steps=2,
  trigger_steps=5,
)

PRESETS = {
  "smoke": SMOKE,
  # 2-core CPU: the paper CNN on 2,000 FashionMNIST points, 4 epochs; patch only in "paper".
  "quick": Config(),
  # The limitations paper's scale: CIFAR-10, ResNet-18 (accelerator), both models via --model.
  "paper": Config(
    dataset="cifar10",
    model="resnet18",
    attacks=ATTACKS,
    max_train=50_000,
    max_test=10_000,
    epochs=40,
    pretrain_epochs=40,
    batch_size=128,
    learning_rate=0.1,
    max_public=10_000,
    surrogate_epochs=20,
    trigger_steps=2_000,
    clip_norms=(1.0,),
    noise_multipliers=(1.0, 4.0),
  ),
}


def defenses(config: Config) -> list[common.Defense]:
  return common.defense_grid(
    config.include_vanilla, config.clip_norms, config.noise_clip, config.noise_multipliers
  )


def ratios(config: Config, attack: str) -> tuple[float, ...]:
  return getattr(config, f"{attack}_ratios")


def validate(config: Config) -> Config:
  """Checks every field (ValueError naming the flag and its range)."""
  common.check_config(config, RULES)
  if not config.attacks:
    raise ValueError("--attacks must name at least one attack")
  if not defenses(config):
    raise ValueError("no defense to evaluate: give --include_vanilla or a defense grid")
  if not config.out:
    raise ValueError("--out must name a folder")
  return config
