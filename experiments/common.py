"""Shared plumbing of the experiment modules: presets, flags, output folders.

Every experiment module defines `PRESETS` (smoke, quick, paper), an importable
`run(config) -> results` that tests call, and a `main` that only parses absl
flags into a config with `config_from_flags`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
from absl import flags

from jaxshape import results

PRESET_NAMES = ("smoke", "quick", "paper")


def define_common_flags() -> None:
  """--preset, --out, --data_dir, --seeds, --progress (defined once per process)."""
  if "preset" in flags.FLAGS:
    return
  flags.DEFINE_enum("preset", "quick", PRESET_NAMES, "Scale of the run (see the module doc).")
  flags.DEFINE_string("out", None, "Output folder (CSV, config.json, PNG).")
  flags.DEFINE_string("data_dir", None, "Folder with the dataset files (see README: Getting data).")
  flags.DEFINE_integer("seeds", None, "Number of seeds (overrides the preset).")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


def config_from_flags(presets: dict[str, Any], overrides: dict[str, Any]):
  """The preset named by --preset with every flag the user set on top of it."""
  fl = flags.FLAGS
  config = presets[fl.preset]
  changes = {"data_dir": fl.data_dir, "progress": fl.progress}
  if fl.out:
    changes["out"] = fl.out
  if fl.seeds is not None:
    changes["seeds"] = fl.seeds
  for name, value in overrides.items():
    if fl[name].present:
      changes[name] = value
  fields = {f.name for f in dataclasses.fields(config)}
  return dataclasses.replace(config, **{k: v for k, v in changes.items() if k in fields})


def prepare_out(config) -> str:
  """Creates the output folder and writes `config.json` there; returns the folder."""
  os.makedirs(config.out, exist_ok=True)
  results.write_json(os.path.join(config.out, "config.json"), dataclasses.asdict(config))
  return config.out


class Timer:
  """Wall time of a block: `with Timer() as t: ...; t.seconds`."""

  def __enter__(self):
    self.start = time.perf_counter()
    self.seconds = 0.0
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start
    return False


def subsample(x, y, limit: int | None, rng_seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(x float32, y int32), or a fixed random subset of `limit` of them in their original order."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  if limit is not None and limit < x.shape[0]:
    keep = np.sort(np.random.default_rng(rng_seed).permutation(x.shape[0])[:limit])
    x, y = x[keep], y[keep]
  return x, y
