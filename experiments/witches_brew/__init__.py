"""Witches' Brew against victims trained from scratch, vanilla vs DP-SGD.

Geiping et al. 2021 poison a budget of clean-label training points (1%,
l-inf 16/255) by gradient matching on a pre-trained model, then train new
victims from scratch on the poisoned set; success is the target classified as
the attacker's class at the end of training. Their DP claim: "differential
privacy trades off validation accuracy to reduce poisoning success". Here:
the paper's CNN on FashionMNIST (a fixed random training subset, so a 1%
budget is 10 poisons and a from-scratch victim takes seconds), T-shirt
targets pushed to shirt (confusable ones: the attacker's own models put them a
few logits from shirt), poisons on the shirts nearest the target, crafted on
an ensemble of surrogates trained like the victims, vanilla and DP-SGD
victims, and a no-poison control per victim key (same initialisation,
batches and noise).

  python -m experiments.witches_brew --preset=smoke   # seconds, tiny
  python -m experiments.witches_brew --preset=quick   # 8 targets x 2 seeds x 3 defenses, 1k points
  python -m experiments.witches_brew --preset=paper   # 40 targets x 3 seeds, 5,000 points

Modules:
  config       Config, presets, flag help and checks.
  victims      from-scratch training stepped from the host (fast convolutions on CPU).
  experiment   surrogate(s), targets, brews, victims and controls, resumable rows.
  report       success / control rates with Wilson intervals, summary.csv, summary.png.

References:
  Geiping et al. 2021, "Witches' Brew: Industrial Scale Data Poisoning via
  Gradient Matching", §4-§5 (from-scratch victims, DP defense).
"""

from experiments.witches_brew.config import PRESETS
from experiments.witches_brew.config import Config
from experiments.witches_brew.experiment import run

__all__ = ["PRESETS", "Config", "run"]
