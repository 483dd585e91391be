"""`python -m experiments.shaping`: flags derived from `Config` (see `config.HELP`)."""

from absl import app

from experiments import common
from experiments.shaping import config as config_lib
from experiments.shaping import experiment


def main(argv):
  del argv
  experiment.run(common.config_from_flags(config_lib.PRESETS))


if __name__ == "__main__":
  common.define_config_flags(config_lib.Config, config_lib.HELP)
  app.run(main)
