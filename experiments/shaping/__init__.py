r"""Gradient shaping beyond DP-SGD (§7): every mechanism against every attack, on one plane.

Mechanisms, each a curve over its hyperparameter: vanilla; DP-SGD's points
(clipping only at `--clip_norms`, clipping at `--noise_clip` plus noise
`--noise_multipliers`); the orientation-aware and robust transforms of
`jaxshape.shaping` (centered clipping over `--centered_radii`, cosine gating
over `--cosine_thresholds`, trimmed mean over `--trim_fractions`, the
coordinate-wise median, quantile-adaptive clipping over `--quantiles`); and the
gradient detector's filter-then-retrain (`jaxshape.detect`: remove the top
`--filter_fractions` of the training set by `--filter_score`, train vanilla).

Attacks: label flipping and Steinhardt et al.'s min-max attack at
`--poison_ratios` on FashionMNIST-3/4 with softmax regression (§6.2's setting,
`experiments.indiscriminate`'s poisons; metric: RAD at the best epoch against
the clean run of the same mechanism and seed), and multi-poison Poison Frogs on
softmax regression / FashionMNIST (§6.4, `experiments.targeted`'s setup,
pre-training and crafting; metric: the share of targets hit with any of
`--mp_poison_counts` poisons, 95% Wilson intervals). The clean-accuracy cost of
a point is vanilla's clean accuracy minus the mechanism's (same seed), in
points.

Outputs in `--out`:
  indiscriminate_runs.csv, multipoison_runs.csv   the resumable sweeps (one row per
                 training run; multi-poison: per run and target).
  results.csv    one row per (attack, ratio, mechanism point, seed): `config.RESULT_COLUMNS`.
  summary.csv    one row per (attack, ratio, mechanism point), over seeds.
  best.csv       each mechanism's best point at a cost of at most 1 and 2 points.
  detect.csv     the detector's and the baselines' ROC AUCs per training set.
  pareto_<attack>.png  metric vs cost, a curve per mechanism, a panel per ratio.
  cache/         pre-trained models, poisons, detector scores (reused on rerun).

Modules:
  config          Config, PRESETS, HELP, RULES, the mechanism grid, result columns.
  detection       detector scores of a training set and the filter's threshold.
  indiscriminate  the label-flip / Steinhardt part.
  multipoison     the multi-poison Poison Frogs part.
  report          summary, best points, the printed tables, Pareto plots.
  experiment      `run(config)`.

Commands (wall times in RESULTS.md, "Beyond DP-SGD (§7)"):
  python -m experiments.shaping --preset=smoke --out=runs/shaping_smoke
  python -m experiments.shaping --preset=quick --out=runs/shaping
  python -m experiments.shaping --preset=paper --out=runs/shaping_paper

References:
  Hong et al. 2020, §6.2, §6.4, §7. Karimireddy, He, Jaggi 2021 (centered
  clipping); Yin et al. 2018 (trimmed mean, median); Andrew et al. 2021
  (quantile clipping); Tran, Li, Madry 2018; Chen et al. 2018 (detector
  baselines).
"""

from experiments.shaping.config import MECHANISMS
from experiments.shaping.config import PRESETS
from experiments.shaping.config import RESULT_COLUMNS
from experiments.shaping.config import Config
from experiments.shaping.config import Mechanism
from experiments.shaping.config import mechanisms
from experiments.shaping.experiment import run

__all__ = [
  "MECHANISMS",
  "PRESETS",
  "RESULT_COLUMNS",
  "Config",
  "Mechanism",
  "mechanisms",
  "run",
]
