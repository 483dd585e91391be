r"""Targeted clean-label poisoning vs gradient shaping (§6.3 Fig. 5, §6.4 Fig. 6, §6.5 Table 3).

For each setup (dataset x model) and seed: pre-train on the clean set, choose
`targets` test points of `target_class` that the model gets right, craft
poisons toward `base_class` against it, and re-train it with them. Success
(§6.1): the target is the attacker's class after *any* re-training epoch while
RAD < 0.05. Tables show the ceiling (the target itself as the poison; one-shot),
Poison Frogs (paper preset), Poison Frogs with a 0.3 watermark (quick presets)
and the no-poison control (the same re-training without the poison), with 95%
Wilson intervals.

  config       Config, PRESETS, flag help and range checks.
  setups       setups and data, pre-training, targets, class-pair margins.
  crafting     ceiling, Poison Frogs (+ watermark), Witches' Brew poisons.
  retrain      the vmapped re-training program and the shared shuffling.
  outcome      the success rule, targeted.csv rows and the summaries.
  report       printed tables and figures.
  experiment   `run(config)`: the whole experiment.

Commands (protocol history and measured numbers: RESULTS.md, "Targeted poisoning"):
  python -m experiments.targeted --preset=smoke --out=runs/targeted_smoke
  python -m experiments.targeted --preset=quick --mode=oneshot
  python -m experiments.targeted --preset=quick --mode=multipoison
  python -m experiments.targeted --preset=quick --scenario=vanilla_then_dp
  python -m experiments.targeted --preset=paper --mode=oneshot

References:
  Hong et al. 2020, §6.1, §6.3 (Fig. 5), §6.4 (Fig. 6), §6.5 (Table 3).
  Shafahi et al. 2018, "Poison Frogs!"; Geiping et al. 2021, "Witches' Brew".
"""

from experiments.targeted.config import ATTACKS
from experiments.targeted.config import MODES
from experiments.targeted.config import PRESETS
from experiments.targeted.config import SCENARIOS
from experiments.targeted.config import Config
from experiments.targeted.config import preset
from experiments.targeted.config import scenario_defaults
from experiments.targeted.config import validate
from experiments.targeted.experiment import check_resumable
from experiments.targeted.experiment import run

__all__ = [
  "ATTACKS",
  "MODES",
  "PRESETS",
  "SCENARIOS",
  "Config",
  "check_resumable",
  "preset",
  "run",
  "scenario_defaults",
  "validate",
]
