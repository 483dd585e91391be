r"""Adaptive vs fixed noise against multi-poison attacks: the question §7.2 left open.

§7.2 proposes noise proportional to the previous epoch's mean per-example
gradient norm, so that noise shrinks as the model (and its gradients) settles,
and asks whether that would stop multi-poison attacks at a smaller utility cost
than DP-SGD's fixed noise. This experiment answers it with numbers.

Defenses, all clipping at C = `--noise_clip` (4): no noise (the common
anchor), fixed Gaussian noise sigma*C (`--fixed_multipliers`, defense "dp")
and adaptive noise sigma x previous epoch's mean clipped norm
(`--adaptive_multipliers`, defense "adaptive"); plus vanilla. For each, the
multi-poison Poison Frogs attack of `experiments/targeted/` (standard
scenario: pre-train and re-train with the defense, poisons 1..k added in
order over `--poison_counts`) gives the success rate (95% Wilson interval)
and poisons needed; the clean utility cost is the RAD of the model trained
with the defense on clean data (pre-training + the no-poison re-training)
against the vanilla model trained the same way, per seed.

Outputs in `--out`:
  multipoison/  the full targeted run (targeted.csv, attempts.csv, ...).
  adaptive.csv  one row per defense: mechanism, sigma, success rate and
                interval, poisons needed, utility RAD (mean, std over seeds).
  adaptive.png  success rate vs utility cost, fixed vs adaptive (the trade-off
                frontiers, with error bars), and poisons needed vs utility cost.
  answer.txt    the answer, derived from the numbers (also printed).

The answer compares the least utility cost at which each mechanism brings the
success rate to `--level` or below (default: half the vanilla rate, the
paper's Fig. 5 criterion), and counts which points of one frontier the other
dominates.

Presets. quick: softmax regression (LR, Adam / DP-Adam, lr 0.08) on
FashionMNIST, the stand-in for the paper's LR / Purchase-100 of §6.4 (why:
RESULTS.md, "§7.2 Adaptive noise"); 10,000 clean training points, 20
pre-training and 8 re-training epochs, 20 targets x 2 seeds, poison counts 1,
2, 4, 8; fixed sigma 0.01, 0.1, 0.4, 1 and adaptive sigma 0.1, 0.4, 1, 4
(adaptive noise scales with the mean clipped norm, below C = 4, so comparable
noise needs a larger sigma). The re-trainings are `experiments/targeted/`'s
(poisons take the slots of clean points); folders from older re-training
versions are refused on rerun.

Commands:
  python -m experiments.adaptive_noise --preset=smoke --out=runs/adaptive_smoke
  python -m experiments.adaptive_noise --preset=quick --out=runs/adaptive_noise

Modules:
  config      Config, PRESETS, adaptive.csv's columns, range checks, the targeted run.
  answer      the rows per mechanism, the frontiers and the derived answer.
  plot        adaptive.png.
  experiment  `run(config)`: the whole experiment.

References:
  Hong et al. 2020, §6.4 (multi-poison; noise helps at a large utility cost),
  §7.2 (the adaptive mechanism, proposed and not built).
"""

from experiments.adaptive_noise.answer import answer
from experiments.adaptive_noise.answer import frontier
from experiments.adaptive_noise.answer import mechanism
from experiments.adaptive_noise.answer import table
from experiments.adaptive_noise.config import COLUMNS
from experiments.adaptive_noise.config import PRESETS
from experiments.adaptive_noise.config import Config
from experiments.adaptive_noise.experiment import run

__all__ = ["COLUMNS", "PRESETS", "Config", "answer", "frontier", "mechanism", "run", "table"]
