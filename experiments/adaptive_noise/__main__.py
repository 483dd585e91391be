"""`python -m experiments.adaptive_noise`: flags, then `experiment.run`."""

from absl import app
from absl import flags

from experiments import common
from experiments.adaptive_noise.config import PRESETS
from experiments.adaptive_noise.experiment import run


def main(argv):
  del argv
  fl = flags.FLAGS
  floats = lambda v: tuple(float(x) for x in v) if v is not None else None
  run(
    common.config_from_flags(
      PRESETS,
      {
        "targets": fl.targets,
        "fixed_multipliers": floats(fl.fixed_multipliers),
        "adaptive_multipliers": floats(fl.adaptive_multipliers),
        "noise_clip": fl.noise_clip,
        "poison_counts": tuple(int(k) for k in fl.poison_counts or ()),
        "max_train": fl.max_train,
        "retrain_epochs": fl.retrain_epochs,
        "level": fl.level,
        "setup": fl.setup,
        "max_batch": fl.max_batch,
      },
    )
  )


def define_flags():
  common.define_common_flags()
  flags.DEFINE_integer("targets", None, "Number of targets.")
  flags.DEFINE_list("fixed_multipliers", None, "Fixed noise multipliers sigma (std sigma*C).")
  flags.DEFINE_list("adaptive_multipliers", None, "Adaptive multipliers (std sigma x mean norm).")
  flags.DEFINE_float("noise_clip", None, "Clip norm C of every noisy defense (default 4).")
  flags.DEFINE_list("poison_counts", None, "Numbers of poisons tried, in order.")
  flags.DEFINE_integer("max_train", None, "Train on a fixed random subset of this size.")
  flags.DEFINE_integer("retrain_epochs", None, "Re-training epochs.")
  flags.DEFINE_float("level", None, "Success level of the answer (default: half of vanilla).")
  flags.DEFINE_string("setup", None, "dataset:model (default fashion_mnist:lr).")
  flags.DEFINE_integer("max_batch", None, "Re-trainings per compiled call (memory).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
