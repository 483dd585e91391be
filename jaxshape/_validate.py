"""Argument checks for the public boundary: each raises `ValueError` naming the argument.

The one home of validation helpers for transforms, training, poisons, loaders
and experiments. Checks run on concrete values only; a traced value (under
`jit`, `vmap` or `optax.inject_hyperparams`) passes through unchecked, so the
pure cores stay usable inside a sweep (STYLE.md: validate at the public
boundary; inside jitted code keep going safely).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def check_range(
  name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
  """Raises ValueError unless every entry of a concrete `value` lies in the interval."""
  if value is None:
    raise ValueError(f"{name} is required")
  if is_traced(value):
    return
  left = "(" if lo_open else "["
  right = ")" if hi_open else "]"
  try:
    if isinstance(value, str | bytes | bool) or np.asarray(value).dtype.kind in "USOb":
      raise TypeError(type(value).__name__)
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a number in {left}{lo}, {hi}{right}, got {value!r}") from e
  lo_ok = array > lo if lo_open else array >= lo
  hi_ok = array < hi if hi_open else array <= hi
  if np.any(np.isnan(array)) or not np.all(lo_ok & hi_ok):
    raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
  """Raises ValueError unless a concrete `value` is finite and > 0."""
  check_range(name, value, 0.0, np.inf, lo_open=True, hi_open=True)


def check_nonnegative(name: str, value: Any) -> None:
  check_range(name, value, 0.0, np.inf, hi_open=True)


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
  """Returns `value` as a Python int, or raises ValueError if it is not one in [lo, hi]."""
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  value = int(value)
  if value < lo or (hi is not None and value > hi):
    upper = "" if hi is None else f", <= {hi}"
    raise ValueError(f"{name} must be >= {lo}{upper}, got {value}")
  return value


def check_count(name: str, value: Any, lo: int) -> None:
  """Raises ValueError unless a concrete `value` is a whole number >= `lo` (and finite).

  Unlike `check_int`, accepts an array or a float holding a whole number (a
  hyperparameter that may also arrive traced), e.g. `steps_per_epoch`.
  """
  if value is None:
    raise ValueError(f"{name} is required (a whole number >= {lo})")
  if is_traced(value):
    return
  array = np.asarray(value)
  if array.dtype.kind not in "iubf":
    raise ValueError(f"{name} must be a whole number >= {lo}, got {value!r}")
  array = array.astype(np.float64)
  if not np.all(np.isfinite(array)) or np.any(array != np.round(array)) or np.any(array < lo):
    raise ValueError(f"{name} must be a whole number >= {lo}, got {value!r}")


def check_key(key: Any) -> None:
  """Raises ValueError unless `key` is a (concrete or traced) JAX PRNG key array."""
  if key is None:
    raise ValueError("key is required: pass a jax.random.key(...) (no silent default)")
  if is_traced(key):
    return
  if not isinstance(key, jax.Array | np.ndarray):
    raise ValueError(f"key must be a jax PRNG key array, got {type(key).__name__}")


@jax.jit
def _range_summary(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(number of non-finite entries, min and max of the finite ones) in one pass."""
  finite = jnp.isfinite(x)
  lo = jnp.min(jnp.where(finite, x, jnp.inf), initial=jnp.inf)
  hi = jnp.max(jnp.where(finite, x, -jnp.inf), initial=-jnp.inf)
  return jnp.sum(~finite), lo, hi


def _range_summary_host(x: np.ndarray) -> tuple[int, float, float]:
  finite = np.isfinite(x)
  if not finite.any():
    return int(x.size), np.inf, -np.inf
  return int(np.sum(~finite)), float(x[finite].min()), float(x[finite].max())


def check_inputs(name: str, x: Any, *, min_rank: int = 1, unit_interval: bool = True) -> jax.Array:
  """Returns `x` as a float32 array of pixels or features in [0, 1], or raises ValueError.

  Refuses NaN, infinities and, with `unit_interval`, values outside [0, 1]
  (e.g. uint8 images in 0..255: divide by 255 first), naming `name` and the
  range found. `unit_interval=False` is for points whose range is being
  checked (e.g. candidate poisons in `feasibility`).
  """
  if x is None:
    raise ValueError(f"{name} is required")
  if is_traced(x):
    return x.astype(jnp.float32)
  try:
    array = x if isinstance(x, jax.Array) else np.asarray(x)
    if array.dtype.kind not in "fiub":
      raise TypeError(array.dtype)
    array = jnp.asarray(array, jnp.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be an array of numbers, got {_describe(x)}") from e
  if array.ndim < min_rank:
    raise ValueError(f"{name} must have rank >= {min_rank}, got shape {array.shape}")
  if min_rank >= 2 and array.shape[0] == 0:
    raise ValueError(f"{name} holds no examples (shape {array.shape})")
  if array.size == 0:
    return array
  summary = _range_summary(array)
  if any(is_traced(v) for v in summary):  # called while tracing an outer jit: check on the host
    summary = _range_summary_host(np.asarray(x, np.float32))
  bad, lo, hi = (float(v) for v in summary)
  if bad:
    raise ValueError(f"{name} holds {int(bad)} NaN or infinite values; clean the inputs first")
  if unit_interval and (lo < 0.0 or hi > 1.0):
    raise ValueError(
      f"{name} holds values in [{lo:g}, {hi:g}], expected pixels or features in [0, 1]"
      + (" (uint8 images: divide by 255)" if hi > 1.0 and lo >= 0.0 else "")
    )
  return array


def _describe(x: Any) -> str:
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    return f"{x.dtype} array of shape {tuple(x.shape)}"
  return type(x).__name__


def check_labels(name: str, y: Any, n: int, num_classes: int | None) -> tuple[jax.Array, int]:
  """Returns integer labels `[n]` as int32 and the number of classes (inferred if None)."""
  if y is None:
    raise ValueError(f"{name} is required")
  array = np.asarray(y)
  if array.ndim != 1 or array.shape[0] != n:
    raise ValueError(f"{name} must have shape [{n}], got {array.shape}")
  if array.dtype.kind == "f":
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
      raise ValueError(f"{name} must hold whole-number class labels (NaN or fractions found)")
  elif array.dtype.kind not in "iub":
    raise ValueError(f"{name} must hold integer class labels, got dtype {array.dtype}")
  if num_classes is None:
    num_classes = max(2, int(array.max()) + 1) if array.size else 2
  num_classes = check_int("num_classes", num_classes, 2)
  if array.size and (array.min() < 0 or array.max() >= num_classes):
    raise ValueError(
      f"{name} has labels in [{array.min()}, {array.max()}], expected [0, {num_classes})"
    )
  return jnp.asarray(array, jnp.int32), num_classes


def check_class(name: str, value: Any, num_classes: int) -> int:
  """Returns a class index as int, or raises ValueError if the class does not exist."""
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise ValueError(f"{name} must be an integer class index, got {value!r}")
  if not 0 <= int(value) < num_classes:
    raise ValueError(f"{name} must be a class in [0, {num_classes}), got {value}")
  return int(value)


def num_from_ratio(ratio: float, n: int) -> int:
  """round(ratio x n) as Python rounds it (the experiments count poisons the same way)."""
  return int(round(float(ratio) * n))


def check_indices(name: str, idx: Any, n: int) -> jax.Array:
  """Returns indices as int32, or raises ValueError when one falls outside [0, n)."""
  array = np.asarray(idx)
  if array.dtype.kind not in "iu":
    raise ValueError(f"{name} must hold integer indices, got dtype {array.dtype}")
  if array.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
  if array.size and (array.min() < 0 or array.max() >= n):
    raise ValueError(f"{name} has indices outside [0, {n})")
  return jnp.asarray(array, jnp.int32)
