"""What a shaping run does: `Config`, presets, flag help, checks and the mechanism grid (§7)."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from experiments import common
from experiments.indiscriminate.config import ATTACKS as INDISCRIMINATE_ATTACKS
from jaxshape import results

PARTS = ("indiscriminate", "multipoison")
MULTIPOISON_ATTACKS = ("poison_frogs", "watermark")
# The order of the mechanisms in tables and plots; `clip` and `noise` are DP-SGD's points.
MECHANISMS = ("vanilla", "clip", "noise", *common.SHAPING_KINDS, "filter")
FILTER_SCORES = ("norm", "combined", "loss")


@dataclasses.dataclass(frozen=True)
class Config:
  out: str = "runs/shaping"
  data_dir: str | None = None
  seeds: int = 3
  progress: bool = True
  parts: tuple[str, ...] = PARTS
  # --- the mechanisms (one curve each over its hyperparameter) --------------------------------
  clip_norms: tuple[float, ...] = (4.0, 1.0)  # DP-SGD clipping only
  noise_multipliers: tuple[float, ...] = (0.1, 0.4)  # DP-SGD noise at C = noise_clip
  noise_clip: float = 4.0
  centered_radii: tuple[float, ...] = (0.5, 2.0)  # centered_clip radius tau
  centered_decay: float = 0.9  # centered_clip reference decay beta
  cosine_thresholds: tuple[float, ...] = (0.0, 0.5)  # cosine_gate threshold kappa
  cosine_clip: float = math.inf  # cosine_gate clip norm of the examples that pass
  trim_fractions: tuple[float, ...] = (0.1, 0.3)  # trimmed_mean beta
  median: bool = True  # coordinate_median
  quantiles: tuple[float, ...] = (0.5, 0.9)  # quantile_clip target quantile gamma
  quantile_initial_clip: float = 4.0
  filter_fractions: tuple[float, ...] = (0.02, 0.1, 0.3)  # detector: share of the set removed
  filter_score: str = "norm"  # detector score the filter ranks by (`jaxshape.detect`)
  # --- indiscriminate part (§6.2's setting; experiments/indiscriminate's attacks) --------------
  dataset: str = "fashion_mnist_3_4"
  attacks: tuple[str, ...] = INDISCRIMINATE_ATTACKS
  poison_ratios: tuple[float, ...] = (0.1, 0.2, 0.4)
  epochs: int = 40
  batch_size: int = 300
  learning_rate: float = 0.01
  max_train: int | None = None
  steinhardt_iterations: int = 200
  detect_epochs: int = 5  # vanilla epochs of the checkpoint the detector scores at
  max_batch: int | None = 64
  # --- multi-poison part (§6.4 on LR; experiments/targeted's crafting) -------------------------
  mp_attack: str = "poison_frogs"
  mp_targets: int = 10
  mp_poison_counts: tuple[int, ...] = (8,)
  mp_max_train: int | None = 10_000
  mp_max_test: int | None = 2_000
  mp_pretrain_epochs: int = 20
  mp_retrain_epochs: int = 8
  mp_batch_size: int = 100
  mp_learning_rate: float = 0.08
  mp_candidates: int = 20
  mp_craft_iters: int = 1_000
  mp_max_batch: int | None = 64


HELP = {
  "out": "Output folder (CSV, config.json, PNG; a cache/ of models and poisons).",
  "data_dir": "Folder with the dataset files (see README: Getting data).",
  "seeds": "Seeds (training runs per configuration; multi-poison: pre-trained models).",
  "progress": "Show progress bars.",
  "parts": f"Parts to run, from {PARTS}.",
  "clip_norms": "DP-SGD clip-only points (sigma 0).",
  "noise_multipliers": "DP-SGD noise points (C = --noise_clip).",
  "noise_clip": "Clip norm of the noise points.",
  "centered_radii": "centered_clip radii tau (Karimireddy et al. 2021).",
  "centered_decay": "centered_clip reference decay beta.",
  "cosine_thresholds": "cosine_gate thresholds kappa in [-1, 1].",
  "cosine_clip": "cosine_gate clip norm of the examples that pass (inf: none).",
  "trim_fractions": "trimmed_mean trim fractions in [0, 0.5) (Yin et al. 2018).",
  "median": "Include coordinate_median.",
  "quantiles": "quantile_clip target quantiles in [0, 1] (Andrew et al. 2021).",
  "quantile_initial_clip": "quantile_clip initial clip norm.",
  "filter_fractions": "Detector filter-then-retrain: fractions of the training set removed.",
  "filter_score": f"Detector score the filter ranks by, from {FILTER_SCORES}.",
  "dataset": "Dataset of the indiscriminate part (default fashion_mnist_3_4).",
  "attacks": f"Indiscriminate attacks, from {INDISCRIMINATE_ATTACKS}.",
  "poison_ratios": "Poison ratios (poisons added / clean), each in (0, 1].",
  "epochs": "Training epochs (indiscriminate).",
  "max_train": "Train on a fixed random subset of the clean set (indiscriminate).",
  "steinhardt_iterations": "Iterations of Steinhardt et al.'s min-max attack.",
  "detect_epochs": "Vanilla epochs of the checkpoint the detector scores at.",
  "max_batch": "Trainings per compiled call (indiscriminate).",
  "mp_attack": f"Multi-poison attack, from {MULTIPOISON_ATTACKS}.",
  "mp_targets": "Multi-poison targets per seed.",
  "mp_poison_counts": "Multi-poison: poison counts tried (success: any of them).",
  "mp_max_train": "Multi-poison: pre-/re-train on a fixed random subset of this many points.",
  "mp_max_test": "Multi-poison: accuracy on a fixed random subset of the test set.",
  "mp_pretrain_epochs": "Multi-poison: vanilla pre-training epochs.",
  "mp_retrain_epochs": "Multi-poison: re-training epochs under each mechanism.",
  "mp_candidates": "Multi-poison: candidate bases per target.",
  "mp_craft_iters": "Multi-poison: crafting iterations.",
  "mp_max_batch": "Multi-poison: re-trainings per compiled call.",
}

RULES = {
  "seeds": (1, None),
  "parts": PARTS,
  "clip_norms": (0, None, "open"),
  "noise_multipliers": (0, None),
  "noise_clip": (0, None, "open"),
  "centered_radii": (0, None, "open"),
  "centered_decay": (0, 1),
  "cosine_thresholds": (-1, 1),
  "cosine_clip": (0, math.inf),  # inf allowed (no clipping); 0 refused in `validate`
  "trim_fractions": (0, 0.4999),
  "quantiles": (0, 1),
  "quantile_initial_clip": (0, None, "open"),
  "filter_fractions": (0, 1, "open"),
  "filter_score": FILTER_SCORES,
  "attacks": INDISCRIMINATE_ATTACKS,
  "poison_ratios": (0, 1, "open"),
  "epochs": (1, None),
  "batch_size": (1, None),
  "learning_rate": (0, None, "open"),
  "max_train": (1, None),
  "steinhardt_iterations": (1, None),
  "detect_epochs": (1, None),
  "max_batch": (1, None),
  "mp_attack": MULTIPOISON_ATTACKS,
  "mp_targets": (1, None),
  "mp_poison_counts": (1, None),
  "mp_max_train": (1, None),
  "mp_max_test": (1, None),
  "mp_pretrain_epochs": (1, None),
  "mp_retrain_epochs": (1, None),
  "mp_batch_size": (1, None),
  "mp_learning_rate": (0, None, "open"),
  "mp_candidates": (1, None),
  "mp_craft_iters": (1, None),
  "mp_max_batch": (1, None),
}

PRESETS = {
  "smoke": Config(
    seeds=2,
    clip_norms=(1.0,),
    noise_multipliers=(0.1,),
    centered_radii=(1.0,),
    cosine_thresholds=(0.0,),
    trim_fractions=(0.2,),
    quantiles=(0.5,),
    filter_fractions=(0.2,),
    poison_ratios=(0.4,),
    epochs=2,
    max_train=300,
    steinhardt_iterations=3,
    detect_epochs=1,
    max_batch=None,
    mp_targets=2,
    mp_poison_counts=(2,),
    mp_max_train=300,
    mp_max_test=300,
    mp_pretrain_epochs=2,
    mp_retrain_epochs=2,
    mp_batch_size=50,
    mp_candidates=4,
    mp_craft_iters=20,
    mp_max_batch=None,
  ),
  "quick": Config(),
  "paper": Config(
    clip_norms=(8.0, 4.0, 2.0, 1.0, 0.1),
    noise_multipliers=(0.01, 0.1, 0.4, 1.0),
    centered_radii=(0.25, 0.5, 1.0, 2.0, 4.0),
    cosine_thresholds=(-0.5, 0.0, 0.25, 0.5, 0.75),
    trim_fractions=(0.05, 0.1, 0.2, 0.3, 0.4, 0.45),
    quantiles=(0.25, 0.5, 0.75, 0.9),
    filter_fractions=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4),
    poison_ratios=(0.05, 0.1, 0.2, 0.3, 0.4),
    mp_targets=100,
    mp_poison_counts=(1, 2, 4, 8),
    mp_max_train=None,
    mp_max_test=None,
    mp_pretrain_epochs=100,
    mp_retrain_epochs=50,
    mp_candidates=100,
    mp_craft_iters=10_000,
    mp_max_batch=8,
  ),
}


# The order the sweeps run the `train` defense kinds in: the cheap ones first, the robust
# aggregators (which materialise and sort the batch's per-example gradients) last, so an
# interrupted run has the most mechanisms done (every finished chunk is kept).
KIND_ORDER = ("vanilla", "dp", "quantile", "centered", "cosine", "trimmed", "median")


def by_cost(jobs: list) -> list:
  """`sweep.Job`s ordered by `KIND_ORDER` of their group (stable)."""
  rank = {k: i for i, k in enumerate(KIND_ORDER)}
  return sorted(jobs, key=lambda j: rank.get(j.group, len(rank)))


class Mechanism(NamedTuple):
  """One point of a mechanism's curve: its name, the `train` defense it trains with, and
  (for the detector's filter-then-retrain) the fraction of the training set removed first."""

  name: str  # one of MECHANISMS
  defense: common.Defense
  filter_fraction: float = 0.0

  @property
  def hyperparameter(self) -> float:
    """The value the mechanism's curve varies (NaN for single points)."""
    d = self.defense
    return {
      "clip": d.clip_norm,
      "noise": d.noise_multiplier,
      "centered": d.clip_norm,
      "cosine": d.shaping_param,
      "trimmed": d.shaping_param,
      "quantile": d.shaping_param,
      "filter": self.filter_fraction,
    }.get(self.name, math.nan)

  @property
  def label(self) -> str:
    names = {
      "clip": "C",
      "noise": "s",
      "centered": "tau",
      "cosine": "kappa",
      "trimmed": "beta",
      "quantile": "q",
      "filter": "removed",
    }
    if self.name not in names:
      return self.name
    return f"{self.name} {names[self.name]}={self.hyperparameter:g}"

  def fields(self) -> dict:
    """The CSV columns that name the mechanism (a job's identity)."""
    d = self.defense
    return {
      "mechanism": self.name,
      "hyperparameter": self.hyperparameter,
      "defense": d.kind,
      "clip_norm": d.clip_norm,
      "noise_multiplier": d.noise_multiplier,
      "shaping_param": d.shaping_param,
      "filter_fraction": self.filter_fraction,
    }


MECHANISM_FIELDS = tuple(Mechanism("vanilla", common.VANILLA).fields())


def mechanism_ident(row) -> tuple:
  """A row's (or `Mechanism.fields()`') mechanism point as canonical text (a dict key)."""
  return tuple(results.canonical(row[f]) for f in MECHANISM_FIELDS)


DETECTORS = ("norm", "cosine", "combined", "loss", "spectral", "activation")  # `detection`
AUC_COLUMNS = tuple(f"auc_{k}" for k in DETECTORS)

# results.csv: one row per (attack, poison ratio, mechanism point, seed). `metric` is the
# attack's: RAD at the best epoch (indiscriminate) or the share of targets hit (multi-poison);
# `clean_acc` the mechanism's accuracy without poisons (same seed), `cost` vanilla's clean
# accuracy minus it, in points; the AUCs are the detector's on that training set.
RESULT_COLUMNS = (
  "attack",
  "poison_ratio",
  "n_poisons",
  *MECHANISM_FIELDS,
  "label",
  "seed",
  "metric_name",
  "metric",
  "acc",
  "clean_acc",
  "cost",
  "targets",
  "successes",
  "control_successes",
  "n_removed",
  "n_poison_removed",
  *AUC_COLUMNS,
)


def mechanisms(config: Config) -> list[Mechanism]:
  """Every point of every mechanism's curve, in `MECHANISMS` order."""
  D = common.Defense
  inf = math.inf
  out = [Mechanism("vanilla", common.VANILLA)]
  out += [Mechanism("clip", D("dp", float(c), 0.0)) for c in config.clip_norms]
  out += [
    Mechanism("noise", D("dp", config.noise_clip, float(s)))
    for s in config.noise_multipliers
    if s > 0
  ]
  out += [
    Mechanism("centered", D("centered", float(r), 0.0, config.centered_decay))
    for r in config.centered_radii
  ]
  out += [
    Mechanism("cosine", D("cosine", config.cosine_clip, 0.0, float(k)))
    for k in config.cosine_thresholds
  ]
  out += [Mechanism("trimmed", D("trimmed", inf, 0.0, float(b))) for b in config.trim_fractions]
  out += [Mechanism("median", D("median", inf, 0.0))] if config.median else []
  out += [
    Mechanism("quantile", D("quantile", config.quantile_initial_clip, 0.0, float(q)))
    for q in config.quantiles
  ]
  out += [Mechanism("filter", common.VANILLA, float(f)) for f in config.filter_fractions]
  return list(dict.fromkeys(out))


def validate(config: Config) -> Config:
  """Checks every field (ValueError naming the flag and its range) before anything is written."""
  common.check_config(config, RULES)
  if not config.cosine_clip > 0:
    raise ValueError(f"--cosine_clip must be > 0 (inf: no clipping), got {config.cosine_clip}")
  if not config.parts:
    raise ValueError(f"--parts must name at least one of {PARTS}")
  if "indiscriminate" in config.parts and not (config.attacks and config.poison_ratios):
    raise ValueError("--attacks and --poison_ratios must be non-empty for the indiscriminate part")
  if "multipoison" in config.parts and not config.mp_poison_counts:
    raise ValueError("--mp_poison_counts must hold at least one count")
  return config
