"""Tests of experiments/common.py: Defense, the defense grid, config checks and derived
flags, the parameter cache."""

import dataclasses
import math

import numpy as np
import pytest
from absl import flags

from experiments import common
from jaxshape import results


def test_defense_labels_slugs_and_rows():
  assert common.VANILLA.label == "vanilla"
  assert common.Defense("dp", 1.0, 0.0).label == "clip C=1"
  assert common.Defense("dp", 4.0, 0.1).label == "noise C=4 s=0.1"
  assert common.Defense("adaptive", 4.0, 0.1).slug == "adaptive_C4_s0.1"
  d = common.Defense("dp", 4.0, 0.01)
  row = {k: str(v) for k, v in d.fields().items()}
  assert common.Defense.from_row(row) == d
  assert d.matches(row) and not common.VANILLA.matches(row)


def test_defense_grid_order_and_duplicates():
  grid = common.defense_grid(True, (4.0, 1.0), 4.0, (0.0, 0.1), (0.1,))
  assert grid == [
    common.VANILLA,
    common.Defense("dp", 4.0, 0.0),
    common.Defense("dp", 1.0, 0.0),
    common.Defense("dp", 4.0, 0.1),
    common.Defense("adaptive", 4.0, 0.1),
  ]
  assert common.defense_grid(False) == []


@dataclasses.dataclass(frozen=True)
class _Config:
  ratio: float = 0.1
  epochs: int = 3
  clips: tuple[float, ...] = (1.0,)
  name: str | None = None
  mode: str = "a"


RULES = {"ratio": (0, 1), "epochs": (1, None), "clips": (0, None, "open"), "mode": ("a", "b")}


@pytest.mark.parametrize(
  "change, match",
  [
    ({"ratio": -0.1}, r"--ratio must lie in \[0, 1\]"),
    ({"ratio": 1.5}, r"--ratio must lie in \[0, 1\]"),
    ({"epochs": 0}, r"--epochs must lie in \[1, inf\)"),
    ({"clips": (1.0, 0.0)}, r"--clips must lie in \(0, inf\)"),
    ({"ratio": math.nan}, "--ratio must be a number"),
    ({"mode": "c"}, "--mode must be among"),
  ],
)
def test_check_config_names_the_flag_and_range(change, match):
  common.check_config(_Config(), RULES)
  with pytest.raises(ValueError, match=match):
    common.check_config(dataclasses.replace(_Config(), **change), RULES)


def test_flags_are_derived_from_the_config():
  fv = flags.FlagValues()
  helps = {"ratio": "r", "epochs": "e", "clips": "c", "name": "n"}
  common.define_config_flags(_Config, helps, flag_values=fv)
  assert "mode" not in fv  # no help, no flag
  fv(["prog", "--epochs=7", "--clips=0.5,2", "--preset=smoke"])
  presets = {"smoke": _Config(), "quick": _Config(epochs=9)}
  config = common.config_from_flags(presets, flag_values=fv)
  assert config == _Config(epochs=7, clips=(0.5, 2.0))


def test_params_cache_round_trip_and_key_mismatch(tmp_path):
  cache = common.ParamsCache(str(tmp_path))
  params = {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3, np.float32)}
  calls = []

  def train():
    calls.append(1)
    return params

  key = {"setup": "x", "seed": 0}
  got = cache.get("model", key, params, train)
  again = cache.get("model", key, params, train)
  assert len(calls) == 1
  for a, b in ((got, params), (again, params)):
    np.testing.assert_array_equal(a["w"], b["w"])
  assert cache.load("model", {"setup": "x", "seed": 1}, params) is None


def test_load_data_notes_the_source_in_config_json(tmp_path):
  @dataclasses.dataclass(frozen=True)
  class Config:
    out: str
    data_dir: str | None = None

  config = Config(out=str(tmp_path))
  common.prepare_out(config)
  ds = common.load_data(config, "two_moons")
  written = results.read_json(str(tmp_path / "config.json"))
  assert written["data_sources"] == {"two_moons": ds.source}
  assert ds.source
