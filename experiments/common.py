"""The shared vocabulary of the experiment modules: defenses, presets and flags, caches.

Every experiment module defines a frozen `Config` dataclass, `PRESETS` (smoke,
quick, paper) of it, an importable `run(config) -> results` that tests call,
and a `main` that only parses absl flags into a config. The flags are derived
from the config's fields (`define_config_flags`, `config_from_flags`), and
every config is checked by `check_config` before anything (config.json) is
written.

  Defense       one gradient-shaping configuration (kind, C, sigma) and its label.
  defense_grid  vanilla + clip-only rows + noise rows (+ §7.2 adaptive rows).
  ParamsCache   pre-trained parameters on disk, keyed by what produced them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
from absl import flags

from jaxshape import _validate
from jaxshape import accounting
from jaxshape import data
from jaxshape import results
from jaxshape import shaping

PRESET_NAMES = ("smoke", "quick", "paper")
COMMON_FIELDS = ("out", "data_dir", "seeds", "progress")

# --- Defenses ---------------------------------------------------------------------------------


SHAPING_KINDS = tuple(shaping.DEFENSES)  # the mechanisms beyond DP-SGD (`jaxshape.shaping`)


class Defense(NamedTuple):
  """One gradient-shaping configuration (§5.1, §7.2, §7): kind ("vanilla", "dp", "adaptive",
  or a mechanism beyond DP-SGD, `SHAPING_KINDS` = `jaxshape.shaping.DEFENSES`), clipping norm
  C (inf for vanilla), noise multiplier sigma and the mechanism's own parameter (its
  `train.HParams.shaping_param`; 0 for the others)."""

  kind: str
  clip_norm: float
  noise_multiplier: float
  shaping_param: float = 0.0

  @property
  def label(self) -> str:
    if self.kind == "vanilla":
      return "vanilla"
    if self.kind in SHAPING_KINDS:
      noise = f" s={self.noise_multiplier:g}" if self.noise_multiplier else ""
      return f"{self.kind} C={self.clip_norm:g} p={self.shaping_param:g}{noise}"
    if self.kind == "adaptive":
      return f"adaptive C={self.clip_norm:g} s={self.noise_multiplier:g}"
    if self.noise_multiplier == 0:
      return f"clip C={self.clip_norm:g}"
    return f"noise C={self.clip_norm:g} s={self.noise_multiplier:g}"

  @property
  def slug(self) -> str:
    """A file-name-safe name: `vanilla`, `dp_C4_s0.01`, `adaptive_C4_s0.1`."""
    if self.kind == "vanilla":
      return "vanilla"
    slug = f"{self.kind}_C{self.clip_norm:g}_s{self.noise_multiplier:g}"
    return slug + (f"_p{self.shaping_param:g}" if self.kind in SHAPING_KINDS else "")

  def fields(self) -> dict:
    """The CSV columns that name the defense (`shaping_param` only for a shaping kind, so
    earlier experiments' CSVs keep their columns)."""
    out = {
      "defense": self.kind,
      "clip_norm": self.clip_norm,
      "noise_multiplier": self.noise_multiplier,
    }
    if self.kind in SHAPING_KINDS:
      out["shaping_param"] = self.shaping_param
    return out

  @classmethod
  def from_row(cls, row: Mapping[str, Any]) -> Defense:
    param = row.get("shaping_param")
    param = 0.0 if param in (None, "") else float(param)
    return cls(str(row["defense"]), float(row["clip_norm"]), float(row["noise_multiplier"]), param)

  def matches(self, row: Mapping[str, Any]) -> bool:
    """Whether a CSV row (parsed or text) names this defense."""
    param = row.get("shaping_param")
    return (
      row["defense"] == self.kind
      and results.canonical(row["clip_norm"]) == results.canonical(self.clip_norm)
      and results.canonical(row["noise_multiplier"]) == results.canonical(self.noise_multiplier)
      and (param in (None, "") or results.canonical(param) == results.canonical(self.shaping_param))
    )


VANILLA = Defense("vanilla", math.inf, 0.0)


def defense_grid(
  include_vanilla: bool = True,
  clip_norms=(),
  noise_clip: float = 4.0,
  noise_multipliers=(),
  adaptive_multipliers=(),
) -> list[Defense]:
  """Vanilla, clipping only (sigma 0), clip `noise_clip` + each noise multiplier, and the
  §7.2 adaptive noise at `noise_clip`; duplicates removed, order kept."""
  grid = [VANILLA] if include_vanilla else []
  grid += [Defense("dp", float(c), 0.0) for c in clip_norms]
  grid += [Defense("dp", float(noise_clip), float(s)) for s in noise_multipliers]
  grid += [Defense("adaptive", float(noise_clip), float(s)) for s in adaptive_multipliers]
  return list(dict.fromkeys(grid))


# --- Config checks and flags ------------------------------------------------------------------


def check_config(config, rules: Mapping[str, tuple]) -> None:
  """Raises ValueError naming the first field outside its range.

  `rules` maps a field to `(lo, hi)` (inclusive; None: unbounded) or `(lo, hi, "open")`
  (both ends exclusive where given) or a tuple of allowed strings; a tuple-valued field is
  checked entry by entry, a None value is skipped.
  """
  for name, rule in rules.items():
    value = getattr(config, name)
    if value is None:
      continue
    values = value if isinstance(value, tuple) else (value,)
    if rule and all(isinstance(r, str) for r in rule):
      bad = [v for v in values if v not in rule]
      if bad:
        raise ValueError(f"--{name} must be among {rule}, got {bad[0]!r}")
      continue
    lo, hi, *opened = rule
    strict = bool(opened)
    for v in values:
      if isinstance(v, str) or v is None or (isinstance(v, float) and math.isnan(v)):
        raise ValueError(f"--{name} must be a number, got {v!r}")
      _validate.check_range(
        f"--{name}",
        v,
        -math.inf if lo is None else lo,
        math.inf if hi is None else hi,
        lo_open=strict and lo is not None,
        hi_open=strict or hi is None,
      )


def _flag_kind(annotation) -> tuple[str, Callable | None]:
  """('integer' | 'float' | 'bool' | 'string' | 'list', element parser) of a field's type
  annotation as written (`from __future__ import annotations`: a string like "int | None")."""
  if not isinstance(annotation, str):  # a module without `from __future__ import annotations`
    plain = isinstance(annotation, type) and not hasattr(annotation, "__args__")
    annotation = annotation.__name__ if plain else str(annotation)
  text = annotation.replace(" ", "").replace("|None", "")
  if text.startswith("tuple["):
    inner = text[len("tuple[") :].split(",")[0]
    return "list", {"int": int, "float": float, "str": str}[inner]
  return {"int": "integer", "float": "float", "bool": "bool", "str": "string"}[text], None


def define_config_flags(config_cls, helps: Mapping[str, str], flag_values=None) -> None:
  """--preset plus one flag per field of `config_cls` (default None: the preset's value).

  Fields absent from `helps` get no flag. Safe to call twice in a process.
  """
  fv = flags.FLAGS if flag_values is None else flag_values
  if "preset" not in fv:
    flags.DEFINE_enum(
      "preset", "quick", PRESET_NAMES, "Scale of the run (see the module doc).", flag_values=fv
    )
  for field in dataclasses.fields(config_cls):
    if field.name not in helps or field.name in fv:
      continue
    kind, _ = _flag_kind(field.type)
    getattr(flags, f"DEFINE_{kind}")(field.name, None, helps[field.name], flag_values=fv)


def config_from_flags(
  presets: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, flag_values=None
):
  """The preset named by --preset with every flag the user set on top of it.

  Without `overrides`, the flags are those `define_config_flags` derived from the config's
  fields; with them (modules not yet on derived flags), the common flags plus `overrides`
  (flag name -> parsed value, applied when the flag was given).
  """
  if overrides is not None:
    return config_from_common_flags(presets, overrides)
  fl = flags.FLAGS if flag_values is None else flag_values
  config = presets[fl.preset]
  changes = {}
  for field in dataclasses.fields(config):
    if field.name not in fl or not fl[field.name].present:
      continue
    value = fl[field.name].value
    kind, parse = _flag_kind(field.type)
    if kind == "list":
      value = tuple(parse(v) for v in value)
    changes[field.name] = value
  return dataclasses.replace(config, **changes)


def define_common_flags() -> None:
  """--preset, --out, --data_dir, --seeds, --progress, for modules not yet on
  `define_config_flags` (defined once per process)."""
  if "preset" not in flags.FLAGS:
    flags.DEFINE_enum("preset", "quick", PRESET_NAMES, "Scale of the run (see the module doc).")
  if "out" in flags.FLAGS:
    return
  flags.DEFINE_string("out", None, "Output folder (CSV, config.json, PNG).")
  flags.DEFINE_string("data_dir", None, "Folder with the dataset files (see README: Getting data).")
  flags.DEFINE_integer("seeds", None, "Number of seeds (overrides the preset).")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


def config_from_common_flags(presets: dict[str, Any], overrides: dict[str, Any]):
  """The older form of `config_from_flags`: the common flags plus an explicit override map."""
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
  """Creates the output folder and writes `config.json` there; returns the folder.

  Callers check the config (`check_config`) first: nothing is written for a bad config.
  """
  os.makedirs(config.out, exist_ok=True)
  results.write_json(os.path.join(config.out, "config.json"), dataclasses.asdict(config))
  return config.out


# The batch sampling every experiment trains with (train.TrainSpec's default), and so the one
# its reported epsilon must assume (accounting.epsilon(..., sampling=SAMPLING); Chua et al. 2024).
SAMPLING = "shuffle"


def defense_epsilon(defense: Defense, n: int, batch_size: int, epochs: int) -> float:
  """Epsilon (delta 1e-5) of `epochs` epochs of `SAMPLING` batches of `batch_size` from `n`
  examples under `defense`; inf without noise."""
  if defense.kind == "vanilla" or defense.noise_multiplier == 0:
    return math.inf
  steps = epochs * -(-n // batch_size)
  q = min(1.0, batch_size / n)
  return accounting.epsilon(defense.noise_multiplier, q, steps, sampling=SAMPLING)


def has_row(rows, **key) -> bool:
  """Whether a row matches every `key` field (compared as `results.canonical` text): the
  resume check of experiments that keep their rows in memory."""
  return any(
    all(results.canonical(r[k]) == results.canonical(v) for k, v in key.items()) for r in rows
  )


def load_data(config, name: str, **kwargs):
  """`data.load(name, data_dir=config.data_dir, **kwargs)`, noting where it came from.

  The data set's `source` (a folder, a file or `tfds:<name>`) is added under
  "data_sources" to the `config.json` of `config.out` when that file exists, so a
  reader of the results knows which copy of the data they came from.
  """
  ds = data.load(name, data_dir=config.data_dir, **kwargs)
  path = os.path.join(config.out or "", "config.json")
  if config.out and os.path.exists(path):
    written = results.read_json(path)
    written.setdefault("data_sources", {})[name] = ds.source
    results.write_json(path, written)
  return ds


# --- Pre-trained parameters -------------------------------------------------------------------


class ParamsCache:
  """Parameters on disk (`.npz`), one file per key, reused only when the key matches.

  The key is a JSON-able dict of everything that produced the parameters (dataset, model,
  training settings, defense, seed); the file name is a readable `name` plus a hash of the
  key, and the key is stored in the file and compared on load.
  """

  def __init__(self, folder: str):
    self.folder = folder

  def _path(self, name: str, key: Mapping[str, Any]) -> tuple[str, str]:
    text = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return os.path.join(self.folder, f"{name}_{digest}.npz"), text

  def load(self, name: str, key: Mapping[str, Any], template):
    """The cached parameters shaped like `template`, or None."""
    path, text = self._path(name, key)
    if not os.path.exists(path):
      return None
    with np.load(path, allow_pickle=False) as f:
      if str(f["key"]) != text:
        return None
      leaves = [f[f"leaf_{i}"] for i in range(len(jax.tree.leaves(template)))]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)

  def save(self, name: str, key: Mapping[str, Any], params) -> None:
    path, text = self._path(name, key)
    os.makedirs(self.folder, exist_ok=True)
    arrays = {f"leaf_{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(params))}
    with results.atomic_open(path, "wb") as f:
      np.savez(f, key=np.asarray(text), **arrays)

  def get(self, name: str, key: Mapping[str, Any], template, train_fn: Callable[[], Any]):
    """The cached parameters, or `train_fn()`'s (saved for the next run)."""
    params = self.load(name, key, template)
    if params is None:
      params = jax.tree.map(np.asarray, train_fn())
      self.save(name, key, params)
    return params


# --- Small helpers ----------------------------------------------------------------------------


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
