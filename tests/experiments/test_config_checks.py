"""Every experiment refuses a bad config before any work or file (issue 13: flags are checked).

Tests `common.check_config` through each module's `run`: the error names the flag, and the
output folder stays empty (no config.json written before the check).
"""

import dataclasses
import os

import pytest

from experiments import adaptive_noise
from experiments import boundary
from experiments import gradient_analysis
from experiments import indiscriminate
from experiments import utility

CASES = [
  (indiscriminate, "poison_ratios", (0.0, -0.1)),
  (indiscriminate, "noise_clip", -1.0),
  (indiscriminate, "clip_norms", (0.0,)),
  (indiscriminate, "seeds", 0),
  (indiscriminate, "epochs", 0),
  (indiscriminate, "noise_multipliers", (-0.1,)),
  (indiscriminate, "poison_ratios", (1.5,)),
  (indiscriminate, "learning_rate", float("nan")),
  (indiscriminate, "attacks", ("label_flp",)),
  (utility, "clip_norms", (-1.0,)),
  (utility, "epochs", 0),
  (gradient_analysis, "alphas", (1.2,)),
  (gradient_analysis, "noise_multipliers", (-1.0,)),
  (gradient_analysis, "seeds", 0),
  (adaptive_noise, "targets", 0),
  (adaptive_noise, "noise_clip", 0.0),
  (boundary, "clip_norm", 0.0),
  (boundary, "delta", 1.0),
  (boundary, "batch_size", 0),
]


@pytest.mark.parametrize(
  "module,field,value", CASES, ids=[f"{m.__name__.split('.')[-1]}-{f}" for m, f, _ in CASES]
)
def test_bad_flag_refused_before_any_file(tmp_path, module, field, value):
  out = tmp_path / "out"
  config = dataclasses.replace(module.PRESETS["smoke"], out=str(out), **{field: value})
  with pytest.raises(ValueError, match=f"--{field}"):
    module.run(config)
  assert not os.path.exists(out / "config.json")
