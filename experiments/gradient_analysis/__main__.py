"""`python -m experiments.gradient_analysis`: flags, then `experiment.run`."""

import dataclasses

from absl import app
from absl import flags

from experiments import common
from experiments.gradient_analysis.config import MEASURES
from experiments.gradient_analysis.config import PRESETS
from experiments.gradient_analysis.config import SCENARIOS
from experiments.gradient_analysis.experiment import run


def main(argv):
  del argv
  fl = flags.FLAGS
  config = common.config_from_flags(
    PRESETS,
    {
      "alphas": tuple(map(float, fl.alphas or ())),
      "patch_sizes": tuple(map(int, fl.patch_sizes or ())),
      "poison_ratios": tuple(map(float, fl.poison_ratios or ())),
      "epochs": fl.epochs,
      "pretrain_epochs": fl.pretrain_epochs,
      "measure": fl.measure,
      "max_batch": fl.max_batch,
      "hidden": tuple(map(int, fl.hidden or ())),
      "retrain_defenses": tuple(fl.retrain_defenses or ()),
    },
  )
  renamed = {
    "scenario": ("scenarios", str),
    "defense": ("defenses", str),
    "clip_norm": ("clip_norms", float),
    "noise_multiplier": ("noise_multipliers", float),
  }
  changes = {
    field: tuple(map(cast, fl[name].value))
    for name, (field, cast) in renamed.items()
    if fl[name].present
  }
  run(dataclasses.replace(config, **changes))


def define_flags():
  common.define_common_flags()
  flags.DEFINE_list("scenario", None, f"Scenarios, from {SCENARIOS}.")
  flags.DEFINE_list("defense", None, "vanilla, dp (DP rows: clip_norm x noise_multiplier).")
  flags.DEFINE_list("retrain_defenses", None, "Defenses of the MLP re-training scenarios.")
  flags.DEFINE_list("clip_norm", None, "DP clip norms C (default 4).")
  flags.DEFINE_list("noise_multiplier", None, "DP noise multipliers sigma (default 0).")
  flags.DEFINE_list("alphas", None, "Watermark intensities of the collision scenarios.")
  flags.DEFINE_list("patch_sizes", None, "Patch sizes of the insertion scenario.")
  flags.DEFINE_list("poison_ratios", None, "Poison ratios of label_flip / steinhardt.")
  flags.DEFINE_integer("epochs", None, "Training epochs of every scenario (default: each its own).")
  flags.DEFINE_integer("pretrain_epochs", None, "Pre-training epochs of the MLP.")
  flags.DEFINE_list("hidden", None, "Hidden layer sizes of the MLP (default 256,256).")
  flags.DEFINE_enum("measure", None, MEASURES, "raw or clipped per-example gradients.")
  flags.DEFINE_integer("max_batch", None, "Most jobs per compiled call (memory).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
