"""`python -m experiments.targeted`: flags derived from `Config` (see `config.HELP`)."""

from absl import app
from absl import flags

from experiments import common
from experiments.targeted import config as config_lib
from experiments.targeted import experiment

DEFENSE_FLAGS = ("clip_norms", "noise_multipliers", "noise_clip", "adaptive_multipliers")


def main(argv):
  del argv
  fl = flags.FLAGS
  mode = fl.mode or config_lib.PRESETS[fl.preset].mode
  presets = {name: config_lib.preset(name, mode) for name in config_lib.PRESETS}
  config = common.config_from_flags(presets)
  if not any(fl[name].present for name in DEFENSE_FLAGS):
    config = config_lib.scenario_defaults(config)
  experiment.run(config)


if __name__ == "__main__":
  common.define_config_flags(config_lib.Config, config_lib.HELP)
  app.run(main)
