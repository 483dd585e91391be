"""`python -m experiments.indiscriminate`: flags, then `experiment.run`."""

from absl import app
from absl import flags

from experiments import common
from experiments.indiscriminate.config import ATTACKS
from experiments.indiscriminate.config import PRESETS
from experiments.indiscriminate.experiment import run


def main(argv):
  del argv
  fl = flags.FLAGS
  overrides = {
    "attacks": tuple(fl.attacks or ()),
    "poison_ratios": tuple(map(float, fl.poison_ratios or ())),
    "clip_norms": tuple(map(float, fl.clip_norms or ())),
    "noise_multipliers": tuple(map(float, fl.noise_multipliers or ())),
    "noise_clip": fl.noise_clip,
    "adaptive": fl.adaptive,
    "epochs": fl.epochs,
    "dataset": fl.dataset,
    "max_batch": fl.max_batch,
  }
  run(common.config_from_flags(PRESETS, overrides))


def define_flags():
  common.define_common_flags()
  flags.DEFINE_list("attacks", None, f"Attacks, from {ATTACKS}.")
  flags.DEFINE_list("poison_ratios", None, "Poison ratios (poisons / clean), 0 included.")
  flags.DEFINE_list("clip_norms", None, "Clip norms of the clip-only rows (sigma = 0).")
  flags.DEFINE_list("noise_multipliers", None, "Noise multipliers (with C = --noise_clip).")
  flags.DEFINE_float("noise_clip", None, "Clip norm of the noise rows.")
  flags.DEFINE_bool("adaptive", None, "Add the §7.2 adaptive-noise rows.")
  flags.DEFINE_integer("epochs", None, "Training epochs.")
  flags.DEFINE_string("dataset", None, "Dataset name (default fashion_mnist_3_4).")
  flags.DEFINE_integer("max_batch", None, "Most jobs per compiled call (memory).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
