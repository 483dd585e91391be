r"""Gradients of poisons vs clean samples during training (paper §3, Fig. 1; §6.2, Fig. 4c/4f).

Shapes: N clean training examples, P poisons (padded), V poison variants, S
seeds, E epochs, B batch.

Five scenarios (`--scenario`, a list), each trained vanilla and with DP
(`--defense=vanilla,dp`; every DP row is one (C, sigma) of `--clip_norm` x
`--noise_multiplier`, default C = 4, sigma = 0, i.e. clipping only):

  collision_scratch  softmax regression (LR) on FashionMNIST-3/4 + 100
                     watermark poisons (a dress overlaid with a coat at alpha,
                     labelled dress); Adam, 40 epochs, batch 300, lr 0.01;
                     setting = alpha in {0.1, 0.2, 0.4, 0.6, 0.8, 1.0}.
  collision_retrain  MLP with two hidden layers of 256 (`--hidden`; the
                     paper's code, not its Table 4) pre-trained on all of
                     FashionMNIST (10 classes; plain SGD, lr 0.04, batch 100,
                     20 epochs, `--pretrain_epochs`; once per seed, cached in
                     `--out`; 0.879-0.884 test accuracy on 3 seeds),
                     re-trained on the 60,000 training points + the same
                     kind of 100 poisons (dress, class 3, overlaid with coat,
                     class 4); SGD, 20 epochs, batch 100, lr 0.04; setting =
                     alpha.
  insertion          the same pre-trained MLP re-trained with 1% patched
                     copies of random training points (white square in the
                     top-left corner, labelled coat = 4); SGD, 20 epochs,
                     batch 100, lr 0.01; setting = patch size in {1, 4, 7, 10, 14}.
  label_flip,        LR on FashionMNIST-3/4 with poisons *added* at
  steinhardt         `--poison_ratios` (default 40%: 4,320 poisons) of random
                     label flipping / Steinhardt et al.'s attack; Adam as in
                     §6.2; setting = poison ratio (Fig. 4c/4f).

Measurement (PROTOCOL.md, "Gradient artifacts"): before every update, the
mean gradient of the batch's clean examples and that of its poisons are taken
at the current parameters; each is averaged over the epoch's batches that
hold at least one example of its kind (a batch without poisons does not pull
the poison mean toward zero); then the magnitude ratio ||g_poison|| /
||g_clean|| and the cosine are computed for the whole model (`layer=all`) and
for the last dense layer's kernel (`layer=last`, the paper code's view). By
default (`--measure=raw`) the gradients are the unclipped ones the data ask
for; `--measure=clipped` averages per-example gradients clipped at the row's C
(what DP training actually sums; vanilla rows are unchanged).

Reading the numbers: once training has settled, an epoch's summed gradient
nearly vanishes, N_clean g_clean + N_poison g_poison ~ 0, so the ratio tends
to N_clean / N_poison and the cosine to -1 whatever the attack (2.5 at 40%
poisons, 108 for 100 poisons among 10,800, 600 and 100 in the re-training
scenarios). The quick runs sit there (LF and Steinhardt 2.50, cosine -1.00).
What departs from it is the informative part: poisons the model absorbs
without conflict (insertion with patches of 4 pixels or more: the ratio falls
from about 120 to 20, the cosine from -0.8 to -0.2 over 20 epochs), and DP
rows measured raw, whose equilibrium is that of the clipped sums (measured
`clipped` they return to 2.50 and -1.00).

Every (setting, defense, seed) of a scenario is one job of a vmapped sweep
(`jaxshape.sweep.run`, resumable): poison sets are crafted per (setting,
seed) up front and indexed inside the program, padded and masked to the
largest count where counts differ. Outputs in `--out`:
  gradients.csv  one row per job x epoch x layer: `scenario, setting, defense,
                 clip_norm, noise_multiplier, seed, epoch, layer, clean_norm,
                 poison_norm, ratio, cosine, test_acc` (vanilla: clip_norm inf).
  gradients.png  ratio (log scale) and cosine vs epoch per scenario, one line
                 per setting (colour) and defense (line style), mean +- std
                 over seeds, for both layer views (Fig. 1, Fig. 4c/4f).
  cache/             the pre-trained MLPs (re-used by a rerun).
and prints mean-over-epochs ratio and cosine per scenario x setting x defense.

Modules:
  config        scenarios, Config, PRESETS, columns, the defense grid, checks.
  crafting      each scenario's data and poisons.
  pretraining   the clean pre-trained MLPs (cached).
  subset_grads  per-batch clean / poison mean gradients and per-epoch artifacts.
  training      one scenario's vmapped training sweep.
  report        the summary table and gradients.png.
  experiment    `run(config)`: the whole experiment.

Commands:
  python -m experiments.gradient_analysis --preset=smoke --out=runs/gradients_smoke
  python -m experiments.gradient_analysis --preset=quick --out=runs/gradients
  python -m experiments.gradient_analysis --preset=quick --scenario=label_flip,steinhardt \
      --out=runs/gradients
  python -m experiments.gradient_analysis --preset=paper --out=runs/gradients_paper

The quick preset is the paper's setup with 3 seeds (paper: 5). Without
the `jaxshape.per_example` engine (DP-SGD on the 256-256 MLP through `vmap(grad)`, about
0.5 s a step on two CPU cores) pass `--retrain_defenses=vanilla`.

References:
  Hong et al. 2020, §3.1-§3.3 (Fig. 1, Fig. 2), §6.2 ("Impact on the
  Gradients", Fig. 4c/4f: LF ratio 2.527 vanilla vs 2.221 DP; Steinhardt
  2.497 vs 3.645).
"""

from experiments.gradient_analysis.config import COLUMNS
from experiments.gradient_analysis.config import DEFENSE_NAMES
from experiments.gradient_analysis.config import LAYERS
from experiments.gradient_analysis.config import MEASURES
from experiments.gradient_analysis.config import PAPER_ALPHAS
from experiments.gradient_analysis.config import PAPER_PATCH_SIZES
from experiments.gradient_analysis.config import PRESETS
from experiments.gradient_analysis.config import RULES
from experiments.gradient_analysis.config import SCENARIO_SPECS
from experiments.gradient_analysis.config import SCENARIOS
from experiments.gradient_analysis.config import Config
from experiments.gradient_analysis.config import Scenario
from experiments.gradient_analysis.config import defense_grid
from experiments.gradient_analysis.config import settings
from experiments.gradient_analysis.config import validate
from experiments.gradient_analysis.crafting import craft
from experiments.gradient_analysis.crafting import load
from experiments.gradient_analysis.experiment import run
from experiments.gradient_analysis.pretraining import pretrain
from experiments.gradient_analysis.report import format_summary
from experiments.gradient_analysis.report import plot
from experiments.gradient_analysis.report import summarize
from experiments.gradient_analysis.subset_grads import epoch_artifacts
from experiments.gradient_analysis.subset_grads import subset_batch_grads

__all__ = [
  "COLUMNS",
  "DEFENSE_NAMES",
  "LAYERS",
  "MEASURES",
  "PAPER_ALPHAS",
  "PAPER_PATCH_SIZES",
  "PRESETS",
  "RULES",
  "SCENARIOS",
  "SCENARIO_SPECS",
  "Config",
  "Scenario",
  "craft",
  "defense_grid",
  "epoch_artifacts",
  "format_summary",
  "load",
  "plot",
  "pretrain",
  "run",
  "settings",
  "subset_batch_grads",
  "summarize",
  "validate",
]
