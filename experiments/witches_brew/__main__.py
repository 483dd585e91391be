"""`python -m experiments.witches_brew`: flags derived from `Config` (see `config.HELP`)."""

from absl import app

from experiments import common
from experiments.witches_brew import config as config_lib
from experiments.witches_brew import experiment


def main(argv):
  del argv
  experiment.run(common.config_from_flags(config_lib.PRESETS))


if __name__ == "__main__":
  common.define_config_flags(config_lib.Config, config_lib.HELP)
  app.run(main)
