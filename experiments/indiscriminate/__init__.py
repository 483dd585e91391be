r"""Indiscriminate poisoning vs gradient shaping (§6.2 Fig. 4; §7.1 Fig. 8; App. E Fig. 11).

Softmax regression on FashionMNIST-3/4 (dress vs coat), trained from scratch
with Adam / DP-Adam (lr 0.01, batch 300, 40 epochs) on the clean set plus
poisons *added* at each ratio, against random label flipping (LF) and
Steinhardt et al.'s min-max attack. Defenses: vanilla; clipping only
(`--clip_norms`, sigma = 0); clipping at `--noise_clip` plus Gaussian noise
(`--noise_multipliers`); and, with `--adaptive`, clipping at `--noise_clip`
plus the §7.2 adaptive noise (`--adaptive_multipliers`).

Every (attack, ratio, defense, seed) runs in one vmapped program per
defense kind: poisoned sets are padded to the largest ratio and masked, so
one compilation serves all ratios, and every job names its training set by
row index into one shared pool (clean points, then each variant's poisons),
so the grid holds one copy of the data. Outputs in `--out`:
  epochs.csv   one row per job x epoch (test accuracy, training accuracy on
               clean and on poison points, loss, norms): the resumable sweep.
  results.csv  one row per job: `attack, poison_ratio, n_poisons, defense,
               clip_norm, noise_multiplier, seed, clean_acc, acc_best,
               acc_final, rad_best, rad_final, epsilon`. `clean_acc` is the
               best test accuracy of the model trained with the same defense
               and seed on the clean set (ratio 0); rad_best compares best
               accuracies, rad_final final ones.
  rad.png      RAD vs poison ratio per attack and defense (Fig. 4a,b,d,e).
  train_acc.png clean vs poison training accuracy per epoch at the largest
               ratio (Fig. 11); pca.png the poisons in 2-D PCA with KMeans
               (Fig. 8) and `pca.csv` with the cluster counts.

Modules:
  config       Config, PRESETS, output columns, range checks, the defense grid.
  crafting     the clean set, label-flip and Steinhardt poisons.
  training     the vmapped training program (one per defense kind).
  report       results.csv rows, the printed table, rad.png, train_acc.png, pca.png.
  experiment   `run(config)`: the whole experiment.

Commands (wall times in README / RESULTS.md):
  python -m experiments.indiscriminate --preset=smoke --out=runs/indiscriminate_smoke
  python -m experiments.indiscriminate --preset=quick --out=runs/indiscriminate  # make demo
  python -m experiments.indiscriminate --preset=paper --out=runs/indiscriminate_paper

References:
  Hong et al. 2020, §6.2 (Fig. 4), §7.1 (Fig. 8), Appendix E (Fig. 11), §7.2.
  Steinhardt, Koh & Liang 2017, "Certified Defenses for Data Poisoning Attacks".
"""

from experiments.indiscriminate.config import ATTACKS
from experiments.indiscriminate.config import EPOCH_COLUMNS
from experiments.indiscriminate.config import PAPER_RATIOS
from experiments.indiscriminate.config import PRESETS
from experiments.indiscriminate.config import RESULT_COLUMNS
from experiments.indiscriminate.config import RULES
from experiments.indiscriminate.config import Config
from experiments.indiscriminate.config import defenses
from experiments.indiscriminate.crafting import craft
from experiments.indiscriminate.crafting import load
from experiments.indiscriminate.experiment import run
from experiments.indiscriminate.report import plot_rad
from experiments.indiscriminate.report import summarize
from experiments.indiscriminate.report import summary_table
from experiments.indiscriminate.training import build_program

__all__ = [
  "ATTACKS",
  "EPOCH_COLUMNS",
  "PAPER_RATIOS",
  "PRESETS",
  "RESULT_COLUMNS",
  "RULES",
  "Config",
  "build_program",
  "craft",
  "defenses",
  "load",
  "plot_rad",
  "run",
  "summarize",
  "summary_table",
]
