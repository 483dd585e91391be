"""The `PoisonSet` type, triggers, `merge` into a training set, and `.npz` files.

Shapes: N clean training examples, P poisons, M evaluation points; `...` is
the shape of one input (H, W, C for images, D for tabular data).

A `PoisonSet` carries the poison inputs and labels together with everything
an experiment needs to evaluate the attack that made them: the clean points
they were made from (`base_idx`), the points they aim at (`target_idx`), the
attacker's class and, for backdoors, the trigger. `merge` *adds* the poisons
to the clean set, as the paper did (§3.1, §6.2), and marks them with an
`is_poison` mask; `save` / `load` write and read them as `.npz` files so a
crafted set can be shared and re-used.

References:
  Hong et al. 2020, §2.1.1 (poisoning mechanisms), §3.1 and §6.1 (poisons
  are added to the clean training set).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxshape import _validate
from jaxshape._typing import ArrayLike
from jaxshape._typing import Data
from jaxshape.data.dataset import DataFormatError
from jaxshape.data.npz import read_npz

FORMAT_VERSION = 1
_INFO_PREFIX = "info/"


@jax.jit
def take_rows(tree: Any, idx: jax.Array) -> Any:
  """`a[idx]` for every array of a pytree, compiled once per shape (no eager dispatch)."""
  return jax.tree.map(lambda a: a[idx], tree)


class Trigger(NamedTuple):
  """A backdoor trigger: `x' = (1 - mask) * x + mask * pattern`, pixel by pixel.

  A patch (BadNets) has mask 1 on the square and 0 elsewhere; a blend (Chen
  et al.) has mask lambda everywhere. Both arrays have the shape of one input.
  """

  mask: jax.Array  # [...] float32 in [0, 1]: weight of the pattern per pixel
  pattern: jax.Array  # [...] float32 in [0, 1]: the pixels the trigger writes


def apply_trigger(x: ArrayLike, trigger: Trigger | PoisonSet) -> jax.Array:
  """Stamps a trigger on inputs `x_N...` (or on one input of the trigger's shape).

  Args:
    x: inputs `[N, ...]` or one input `[...]`, in [0, 1].
    trigger: a `Trigger`, or a `PoisonSet` that carries one.

  Returns:
    `(1 - mask) * x + mask * pattern`, float32, clipped to [0, 1].

  Example:
    >>> x_test_trig = apply_trigger(x_test, poisons)   # poisons from patch_backdoor
  """
  if isinstance(trigger, PoisonSet):
    if trigger.trigger is None:
      raise ValueError(f"trigger: this PoisonSet ({trigger.attack}) carries no trigger")
    trigger = trigger.trigger
  x = _validate.check_inputs("x", x)
  mask, pattern = jnp.asarray(trigger.mask), jnp.asarray(trigger.pattern)
  if x.shape == mask.shape:
    return _stamp(x[None], mask, pattern)[0]
  if x.shape[1:] != mask.shape:
    raise ValueError(f"x has inputs of shape {x.shape[1:]}, the trigger is {mask.shape}")
  return _stamp(x, mask, pattern)


@jax.jit
def _stamp(x_N, mask, pattern):
  out_N = (1.0 - mask[None]) * x_N + (mask * pattern)[None]
  return jnp.clip(out_N, 0.0, 1.0)


def backdoor_test_set(
  x: ArrayLike, y: ArrayLike, trigger: Trigger | PoisonSet, target_class: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """Triggered test inputs not of the attacker's class, labelled with that class.

  `train.accuracy(model, params, *backdoor_test_set(...))` is then the attack
  success rate: the fraction of triggered inputs classified as the attacker's
  class (points already of that class are left out, as is usual).

  Args:
    x: clean test inputs `[M, ...]`.
    y: their labels `[M]`.
    trigger: a `Trigger` or a `PoisonSet` carrying one (and its target class).
    target_class: the attacker's class; defaults to the PoisonSet's.

  Returns:
    `(x_triggered, y_target)`, both with the points of class `target_class`
    removed.
  """
  if target_class is None:
    if not isinstance(trigger, PoisonSet) or trigger.target_class < 0:
      raise ValueError("target_class is required unless trigger is a PoisonSet with one")
    target_class = trigger.target_class
  y_M = np.asarray(y)
  keep = np.flatnonzero(y_M != target_class)
  x_kept = take_rows(jnp.asarray(x), jnp.asarray(keep, jnp.int32))
  y_adv = jnp.asarray(np.full([keep.size], target_class, np.int32))
  return apply_trigger(x_kept, trigger), y_adv


@dataclasses.dataclass(frozen=True, eq=False)
class PoisonSet:
  """Crafted poisons and the metadata needed to evaluate the attack.

  Attributes:
    x: poison inputs `[P, ...]`, float32 in [0, 1].
    y: the labels the poisons carry, `[P]` int32.
    attack: name of the attack that made them ("label_flip", "watermark",
      "patch", "blend", "steinhardt", "poison_frogs", "witches_brew").
    base_idx: `[P]` int32, index of the clean point each poison was made
      from in the split named by `base_split`; -1 where there is none.
    target_idx: `[P]` int32, index of the point each poison aims at in the
      split named by `target_split`; -1 where there is none.
    target_class: the attacker's class (backdoors: the class triggered inputs
      should get; targeted attacks: the class the target should get); -1 if
      the attack has none.
    base_split: "train", "test" or "" (what `base_idx` indexes).
    target_split: "train", "test" or "" (what `target_idx` indexes).
    trigger: the backdoor `Trigger`, or None.
    config: the crafting hyperparameters (JSON-serialisable scalars/strings).
    info: per-attack diagnostics, arrays named with shape suffixes; those
      ending in `_P` have one entry per poison and follow `take`.
  """

  x: jax.Array
  y: jax.Array
  attack: str
  base_idx: jax.Array
  target_idx: jax.Array
  target_class: int = -1
  base_split: str = ""
  target_split: str = ""
  trigger: Trigger | None = None
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  info: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    p = self.x.shape[0]
    for name in ("y", "base_idx", "target_idx"):
      shape = getattr(self, name).shape
      if shape != (p,):
        raise ValueError(f"PoisonSet.{name} must have shape [{p}], got {shape}")
    for name, value in self.info.items():
      if name.endswith("_P") and np.shape(value)[:1] != (p,):
        raise ValueError(f"PoisonSet.info[{name!r}] must have a leading axis of {p}")

  def __len__(self) -> int:
    return int(self.x.shape[0])

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[1:])

  def take(self, indices: ArrayLike) -> PoisonSet:
    """The poisons at `indices` (in that order), with their per-poison info."""
    idx = _validate.check_indices("indices", indices, len(self))
    rows = {k: jnp.asarray(v) for k, v in self.info.items() if k.endswith("_P")}
    rows.update(x=self.x, y=self.y, base_idx=self.base_idx, target_idx=self.target_idx)
    rows = take_rows(rows, idx)
    info = {k: rows.pop(k) if k.endswith("_P") else v for k, v in self.info.items()}
    return dataclasses.replace(self, info=info, **rows)

  def first(self, k: int) -> PoisonSet:
    """Poisons 0..k-1: the multi-poison protocol adds them in this order (§6.4)."""
    k = _validate.check_int("k", k, 0, len(self))
    return self.take(np.arange(k))


def _from_dataset_like(data: Any) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], int | None]:
  """(x, y, other per-example arrays, num_classes or None) of a Dataset, dict or (x, y)."""
  if hasattr(data, "x_train") and hasattr(data, "y_train"):
    return jnp.asarray(data.x_train), jnp.asarray(data.y_train), {}, data.num_classes
  if isinstance(data, Mapping):
    if "x" not in data or "y" not in data:
      raise ValueError(f"data must have keys 'x' and 'y', got {sorted(data)}")
    extra = {k: jnp.asarray(v) for k, v in data.items() if k not in ("x", "y")}
    return jnp.asarray(data["x"]), jnp.asarray(data["y"]), extra, None
  if isinstance(data, tuple | list) and len(data) == 2:
    return jnp.asarray(data[0]), jnp.asarray(data[1]), {}, None
  raise ValueError("data must be a jaxshape Dataset, a dict with 'x' and 'y', or a tuple (x, y)")


def merge(
  data: Any,
  poisons: PoisonSet,
  *,
  num_active: ArrayLike | None = None,
  replace: bool = False,
) -> Data:
  """The poisoned training set: clean examples followed by the poisons (or replaced by them).

  Args:
    data: the clean training set: a `jaxshape.data.Dataset` (its train split),
      a dict with `x`, `y` (and optionally `is_poison`, `mask`, `weight`:
      merging twice keeps earlier poisons marked), or a tuple `(x, y)`.
    poisons: the `PoisonSet` to add.
    num_active: optional number of poisons that count (may be a traced
      integer, e.g. to sweep the ratio under `vmap`): all P poisons are
      appended but only the first `num_active` get `mask` 1, the others 0.
      `train.fit` never draws masked rows, so this trains like a set built
      with `poisons.first(k)` (up to the shuffling), at one compiled shape.
    replace: instead of adding the poisons, put each in place of the training
      point it was made from (`base_idx`, which must index the training
      set): the clean-label protocol of Witches' Brew, whose poisons are
      perturbed training points. The set keeps N rows; with `num_active`
      only the first `num_active` poisons replace their bases.

  Returns:
    A dict ready for `train.fit(..., data)`: `x` `[N+P, ...]` float32, `y`
    `[N+P]` int32, `is_poison` `[N+P]` float32 (1.0 for poisons), and `mask` /
    `weight` `[N+P]` float32 when given or when `num_active` is set (N rows,
    and no `mask` from `num_active`, with `replace`).

  Example:
    >>> poisons = label_flip(key, ds.x_train, ds.y_train, ratio=0.4)
    >>> result = train.fit(spec, hparams, key, merge(ds, poisons))
  """
  x_N, y_N, extra, num_classes = _from_dataset_like(data)
  x_N = _validate.check_inputs("data x", x_N, min_rank=2)
  if not isinstance(poisons, PoisonSet):
    raise ValueError(f"poisons must be a PoisonSet, got {type(poisons).__name__}")
  if x_N.shape[1:] != poisons.x.shape[1:]:
    raise ValueError(f"poisons have inputs of shape {poisons.input_shape}, data {x_N.shape[1:]}")
  if y_N.shape != (x_N.shape[0],):
    raise ValueError(f"data y must have shape [{x_N.shape[0]}], got {y_N.shape}")
  unknown = set(extra) - {"is_poison", "mask", "weight"}
  if unknown:
    raise ValueError(f"data has per-example keys merge cannot extend: {sorted(unknown)}")
  if num_classes is not None and len(poisons):
    y_P = np.asarray(poisons.y)
    y_max = int(y_P.max())
    if y_max >= num_classes or int(y_P.min()) < 0:
      raise ValueError(f"poison labels must lie in [0, {num_classes}), got up to {y_max}")
  p = len(poisons)
  if num_active is not None and not _validate.is_traced(num_active):
    _validate.check_range("num_active", num_active, 0, p)
  active = jnp.asarray(p if num_active is None else num_active)
  if replace:
    base_P = np.asarray(poisons.base_idx)
    if poisons.base_split != "train" or np.any(base_P < 0) or np.any(base_P >= x_N.shape[0]):
      raise ValueError("replace: the poisons' base_idx must index the training set")
    if np.unique(base_P).size != base_P.size:
      raise ValueError("replace: two poisons share a base point")
    return _replace_arrays(x_N, y_N, extra, poisons.x, poisons.y, poisons.base_idx, active)
  return _merge_arrays(x_N, y_N, extra, poisons.x, poisons.y, active, num_active is not None)


@jax.jit
def _replace_arrays(x_N, y_N, extra, x_P, y_P, base_P, active):
  """Training set with the first `active` poisons written over their bases."""
  on_P = jnp.arange(x_P.shape[0]) < active
  on_X = on_P.reshape((-1,) + (1,) * (x_P.ndim - 1))
  x_N = x_N.astype(jnp.float32)
  out = {
    "x": x_N.at[base_P].set(jnp.where(on_X, x_P.astype(jnp.float32), x_N[base_P])),
    "y": y_N.astype(jnp.int32).at[base_P].set(jnp.where(on_P, y_P, y_N[base_P])),
  }
  mark_N = extra.get("is_poison", jnp.zeros(y_N.shape, jnp.float32)).astype(jnp.float32)
  out["is_poison"] = mark_N.at[base_P].max(on_P.astype(jnp.float32))
  out.update({k: v.astype(jnp.float32) for k, v in extra.items() if k != "is_poison"})
  return out


@functools.partial(jax.jit, static_argnums=(6,))
def _merge_arrays(x_N, y_N, extra, x_P, y_P, active, with_mask):
  """The concatenation of `merge`, compiled once per shape (no eager op-by-op dispatch)."""
  n, p = x_N.shape[0], x_P.shape[0]
  out = {
    "x": jnp.concatenate([x_N.astype(jnp.float32), x_P.astype(jnp.float32)]),
    "y": jnp.concatenate([y_N.astype(jnp.int32), y_P.astype(jnp.int32)]),
  }
  clean_mark = extra.get("is_poison", jnp.zeros([n], jnp.float32)).astype(jnp.float32)
  out["is_poison"] = jnp.concatenate([clean_mark, jnp.ones([p], jnp.float32)])
  if "weight" in extra:
    out["weight"] = jnp.concatenate([extra["weight"].astype(jnp.float32), jnp.ones([p])])
  if "mask" in extra or with_mask:
    mask_N = extra.get("mask", jnp.ones([n], jnp.float32)).astype(jnp.float32)
    mask_P = (jnp.arange(p) < active).astype(jnp.float32)
    out["mask"] = jnp.concatenate([mask_N, mask_P])
  return out


# ------------------------------------------------------------------ files


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, tuple | list):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic | jax.Array) and np.ndim(value) == 0:
    return np.asarray(value).item()
  if value is None or isinstance(value, bool | int | float | str):
    return value
  raise ValueError(f"config values must be scalars or strings, got {type(value).__name__}")


def save(path: str | os.PathLike[str], poisons: PoisonSet) -> None:
  """Writes `poisons` to an `.npz` file, atomically (temp file + `os.replace`).

  Arrays are stored as `x`, `y`, `base_idx`, `target_idx`, `trigger_mask`,
  `trigger_pattern` (when there is a trigger) and `info/<name>`; the rest
  (attack, target class, splits, config, format version) as JSON in `meta`.

  Example:
    >>> save("runs/poisons/steinhardt_eps0.4.npz", poisons)
    >>> same = load("runs/poisons/steinhardt_eps0.4.npz")
  """
  path = os.fspath(path)
  meta = {
    "format_version": FORMAT_VERSION,
    "attack": poisons.attack,
    "target_class": int(poisons.target_class),
    "base_split": poisons.base_split,
    "target_split": poisons.target_split,
    "config": _jsonable(dict(poisons.config)),
  }
  arrays = {
    "x": np.asarray(poisons.x, np.float32),
    "y": np.asarray(poisons.y, np.int32),
    "base_idx": np.asarray(poisons.base_idx, np.int32),
    "target_idx": np.asarray(poisons.target_idx, np.int32),
    "meta": np.asarray(json.dumps(meta)),
  }
  if poisons.trigger is not None:
    arrays["trigger_mask"] = np.asarray(poisons.trigger.mask, np.float32)
    arrays["trigger_pattern"] = np.asarray(poisons.trigger.pattern, np.float32)
  for name, value in poisons.info.items():
    arrays[_INFO_PREFIX + name] = np.asarray(value)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load(path: str | os.PathLike[str]) -> PoisonSet:
  """Reads a `PoisonSet` written by `save`.

  Raises:
    FileNotFoundError: no file at `path`.
    DataFormatError: (`jaxshape.data.DataFormatError`, a ValueError) the
      file is not a PoisonSet `.npz`: truncated, failing a CRC-32 check, not
      a zip archive, missing arrays, unreadable or incomplete `meta` JSON,
      arrays of the wrong shape or type, or written by a newer jaxshape. The
      message names the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    if os.path.exists(path):
      raise DataFormatError(path, "is not a regular file, expected a PoisonSet .npz")
    raise FileNotFoundError(f"no PoisonSet file at {path}")
  arrays = read_npz(path)
  missing = {"x", "y", "base_idx", "target_idx", "meta"} - set(arrays)
  if missing:
    raise DataFormatError(path, f"not a PoisonSet file (missing {sorted(missing)})")
  meta = _read_meta(path, arrays["meta"])
  x = arrays["x"]
  if x.dtype.kind != "f" or x.ndim < 2:
    raise DataFormatError(path, f"x is {x.dtype} {x.shape}, expected float [P, ...]")
  p = x.shape[0]
  for name in ("y", "base_idx", "target_idx"):
    if arrays[name].dtype.kind not in "iu" or arrays[name].shape != (p,):
      raise DataFormatError(
        path, f"{name} is {arrays[name].dtype} {arrays[name].shape}, expected integers [{p}]"
      )
  trigger = None
  if "trigger_mask" in arrays or "trigger_pattern" in arrays:
    mask, pattern = arrays.get("trigger_mask"), arrays.get("trigger_pattern")
    if mask is None or pattern is None or mask.shape != x.shape[1:] or pattern.shape != mask.shape:
      raise DataFormatError(path, f"trigger arrays must both have the input shape {x.shape[1:]}")
    trigger = Trigger(jnp.asarray(mask, jnp.float32), jnp.asarray(pattern, jnp.float32))
  info = {
    k.removeprefix(_INFO_PREFIX): jnp.asarray(v)
    for k, v in arrays.items()
    if k.startswith(_INFO_PREFIX)
  }
  try:
    return PoisonSet(
      x=jnp.asarray(x, jnp.float32),
      y=jnp.asarray(arrays["y"], jnp.int32),
      attack=meta["attack"],
      base_idx=jnp.asarray(arrays["base_idx"], jnp.int32),
      target_idx=jnp.asarray(arrays["target_idx"], jnp.int32),
      target_class=meta["target_class"],
      base_split=meta["base_split"],
      target_split=meta["target_split"],
      trigger=trigger,
      config=meta["config"],
      info=info,
    )
  except ValueError as e:  # PoisonSet's own shape checks (e.g. per-poison info)
    raise DataFormatError(path, f"not a consistent PoisonSet ({e})") from e


# The fields of `meta` and their JSON types.
_META_TYPES = {
  "format_version": int,
  "attack": str,
  "target_class": int,
  "base_split": str,
  "target_split": str,
  "config": dict,
}


def _read_meta(path: str, meta_array: np.ndarray) -> dict[str, Any]:
  """The `meta` JSON of a PoisonSet file, checked field by field."""
  if meta_array.shape != () or meta_array.dtype.kind != "U":
    raise DataFormatError(path, f"meta is {meta_array.dtype} {meta_array.shape}, expected a string")
  try:
    meta = json.loads(str(meta_array))
  except ValueError as e:  # json.JSONDecodeError is a ValueError
    raise DataFormatError(path, f"meta is not valid JSON ({e})") from e
  if not isinstance(meta, dict):
    raise DataFormatError(path, f"meta is a JSON {type(meta).__name__}, expected an object")
  for name, kind in _META_TYPES.items():
    if name not in meta:
      raise DataFormatError(path, f"meta lacks {name!r}")
    value = meta[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise DataFormatError(path, f"meta {name!r} is {value!r}, expected a {kind.__name__}")
  if meta["format_version"] > FORMAT_VERSION:
    raise DataFormatError(
      path,
      f"written by a newer jaxshape (format {meta['format_version']} > {FORMAT_VERSION}); "
      "upgrade jaxshape to read it",
    )
  return meta
