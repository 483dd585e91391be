"""Backdoors (Blend, Patch, Narcissus) against gradient shaping, vanilla vs DP-SGD.

`python -m experiments.backdoor --preset=quick [--protocol=direct|finetune]`
(presets smoke/quick/paper in `config.PRESETS`). The limitations paper's
Tables 1-2 (papers/limitations-of-gradient-shaping.md) on FashionMNIST
stand-ins; see `experiment` for the protocol and RESULTS.md for numbers.
"""

from experiments.backdoor.config import PRESETS
from experiments.backdoor.config import Config
from experiments.backdoor.experiment import COLUMNS
from experiments.backdoor.experiment import run

__all__ = ["COLUMNS", "PRESETS", "Config", "run"]
