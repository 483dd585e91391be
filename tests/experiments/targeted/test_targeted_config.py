"""Tests of experiments/targeted/config.py: checks before anything is written, presets,
flags derived from the config."""

import dataclasses
import os

import pytest
from absl import flags

from experiments import common
from experiments import targeted
from experiments.targeted import config as config_lib


@pytest.mark.parametrize(
  "change, match",
  [
    ({"targets": 0}, "--targets"),
    ({"seeds": 0}, "--seeds"),
    ({"retrain_epochs": 0}, "--retrain_epochs"),
    ({"clip_norms": (1.0, 0.0)}, "--clip_norms must lie in"),
    ({"noise_multipliers": (-0.1,)}, "--noise_multipliers"),
    ({"noise_clip": 0.0}, "--noise_clip"),
    ({"watermark": 1.5}, r"--watermark must lie in \[0, 1\]"),
    ({"poison_counts": (0, 1)}, "--poison_counts"),
    ({"poison_counts": ()}, "--poison_counts"),
    ({"attacks": ("nope",)}, "--attacks must be among"),
    ({"mode": "twoshot"}, "--mode"),
    ({"base_class": 0}, "must differ"),
    ({"include_vanilla": False, "clip_norms": (), "noise_multipliers": ()}, "no defense"),
  ],
)
def test_validate_names_the_flag_before_writing(tmp_path, change, match):
  out = tmp_path / "run"
  config = dataclasses.replace(config_lib.SMOKE, out=str(out), **change)
  with pytest.raises(ValueError, match=match):
    targeted.run(config)
  assert not os.path.exists(out)  # no config.json for a bad config


def test_presets_and_scenario_defaults():
  quick = config_lib.preset("quick", "multipoison")
  assert quick.mode == "multipoison" and quick.targets >= 40
  assert (quick.target_class, quick.base_class) == (0, 6)
  assert quick.attacks == ("watermark",)  # multi-poison: the attack that works, no ceiling
  assert config_lib.preset("quick", "oneshot").attacks == ("ceiling", "watermark")
  assert config_lib.preset("paper").attacks == ("ceiling", "poison_frogs")
  # Vanilla + 3 defenses in both quick modes, so poisons needed is measured per defense.
  assert config_lib.defenses(quick) == [
    common.VANILLA,
    common.Defense("dp", 1.0, 0.0),
    common.Defense("dp", 4.0, 0.0),
    common.Defense("dp", 4.0, 0.1),
  ]
  assert config_lib.validate(config_lib.preset("paper")).out == "runs/targeted/oneshot_standard"
  t3 = config_lib.scenario_defaults(dataclasses.replace(quick, scenario="vanilla_then_dp"))
  assert config_lib.defenses(t3) == [common.VANILLA, common.Defense("dp", 4.0, 0.01)]


def test_every_help_names_a_field_and_flags_parse():
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  assert set(config_lib.HELP) <= fields
  fv = flags.FlagValues()
  common.define_config_flags(config_lib.Config, config_lib.HELP, flag_values=fv)
  fv(["prog", "--preset=smoke", "--attacks=ceiling", "--hidden=256,256", "--target_class=4"])
  config = common.config_from_flags(config_lib.PRESETS, flag_values=fv)
  assert config.attacks == ("ceiling",) and config.hidden == (256, 256)
  assert config.target_class == 4 and config.targets == config_lib.SMOKE.targets
