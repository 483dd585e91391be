"""The `Dataset` container, the loaders' error types and shared validation.

Shapes: N examples, H height, W width, C channels, D features.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

__all__ = [
  "DataFormatError",
  "DataNotFoundError",
  "Dataset",
]


class DataNotFoundError(FileNotFoundError):
  """No source holds the requested data set; the message lists every place looked."""


class DataFormatError(ValueError):
  """A data file exists but is corrupt, truncated or not in the expected format."""

  def __init__(self, path: str | os.PathLike[str], problem: str):
    self.path = os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
  """A loaded data set: numpy arrays, ready to be moved to a device.

  Inputs are float32 in [0, 1] (images NHWC, tabular data [N, D]); labels are
  int32 in [0, num_classes). The fields are read-only views of the arrays
  given: copy before editing.

  Attributes:
    name: the name passed to `jaxshape.data.load`.
    x_train: training inputs, [N, H, W, C] or [N, D], float32.
    y_train: training labels, [N], int32.
    x_test: test inputs, like `x_train`.
    y_test: test labels, [N], int32.
    num_classes: number of classes.
    x_holdout: held-out inputs where the protocol keeps some (FashionMNIST-3/4),
      else None.
    y_holdout: held-out labels, or None.
    class_names: a name per class where known, else ().
    source: where the data came from (a folder, a file, `tfds:<name>` or
      `generated`).
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  x_holdout: np.ndarray | None = None
  y_holdout: np.ndarray | None = None
  class_names: tuple[str, ...] = ()
  source: str = ""

  def __post_init__(self):
    if (self.x_holdout is None) != (self.y_holdout is None):
      raise ValueError("x_holdout and y_holdout must both be given or both be None")
    if self.class_names and len(self.class_names) != self.num_classes:
      raise ValueError(
        f"class_names has {len(self.class_names)} names for {self.num_classes} classes"
      )
    splits = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
    if self.x_holdout is not None:
      splits.append(("holdout", self.x_holdout, self.y_holdout))
    for split, x, y in splits:
      _check_split(split, x, y, self.num_classes, self.x_train.shape[1:])
      # Hold read-only views: the caller's arrays stay writable.
      for field, array in ((f"x_{split}", x), (f"y_{split}", y)):
        view = array.view()
        view.setflags(write=False)
        object.__setattr__(self, field, view)

  @property
  def input_shape(self) -> tuple[int, ...]:
    """The shape of one input, e.g. (28, 28, 1) or (600,)."""
    return tuple(self.x_train.shape[1:])

  def __repr__(self) -> str:
    parts = [f"name={self.name!r}"]
    for field in ("x_train", "y_train", "x_holdout", "y_holdout", "x_test", "y_test"):
      array = getattr(self, field)
      if array is not None:
        parts.append(f"{field}={array.dtype}{list(array.shape)}")
    parts += [f"num_classes={self.num_classes}", f"source={self.source!r}"]
    return f"Dataset({', '.join(parts)})"


def _check_split(
  split: str, x: np.ndarray, y: np.ndarray, num_classes: int, input_shape: tuple[int, ...]
) -> None:
  """Checks the dtypes, shapes and label range of one split."""
  if not isinstance(x, np.ndarray) or x.dtype != np.float32:
    raise ValueError(f"x_{split} must be a float32 numpy array, got {_describe(x)}")
  if not isinstance(y, np.ndarray) or y.dtype != np.int32 or y.ndim != 1:
    raise ValueError(f"y_{split} must be a 1-D int32 numpy array, got {_describe(y)}")
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]}")
  if x.shape[1:] != input_shape:
    raise ValueError(f"x_{split} has inputs of shape {x.shape[1:]}, expected {input_shape}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"y_{split} has labels outside [0, {num_classes})")


def _describe(a: object) -> str:
  if isinstance(a, np.ndarray):
    return f"{a.dtype} array of shape {a.shape}"
  return type(a).__name__


def check_not_other_entry(path: Path, expected: str) -> None:
  """Raises `DataFormatError` when `path` exists but is not a regular file (e.g. a folder).

  A data file's name held by a folder is a mistake to report, not a missing
  file to look for elsewhere.
  """
  if path.exists() and not path.is_file():
    kind = "a folder" if path.is_dir() else "not a regular file"
    raise DataFormatError(path, f"is {kind}, expected {expected}")


def check_labels(y_N: np.ndarray, num_classes: int, path: str | os.PathLike[str]) -> np.ndarray:
  """Returns integer labels as int32, or raises `DataFormatError` naming `path`."""
  if y_N.ndim != 1:
    raise DataFormatError(path, f"labels must be 1-D, got shape {y_N.shape}")
  if y_N.dtype.kind == "f":
    if not np.all(np.isfinite(y_N)) or np.any(y_N != np.round(y_N)):
      raise DataFormatError(path, "labels are not all whole numbers")
  elif y_N.dtype.kind not in "iub":
    raise DataFormatError(path, f"labels have dtype {y_N.dtype}, expected integers")
  if y_N.size:
    lo, hi = y_N.min(), y_N.max()
    if lo < 0 or hi >= num_classes:
      raise DataFormatError(
        path, f"label out of range: labels span [{lo}, {hi}], expected [0, {num_classes})"
      )
  return y_N.astype(np.int32)


def check_unit_features(x_N: np.ndarray, path: str | os.PathLike[str]) -> None:
  """Checks that features are finite numbers in [0, 1], or raises `DataFormatError`."""
  if x_N.dtype.kind not in "fiub":
    raise DataFormatError(path, f"features have dtype {x_N.dtype}, expected numbers")
  if x_N.dtype.kind == "f" and not np.all(np.isfinite(x_N)):
    raise DataFormatError(path, f"{np.sum(~np.isfinite(x_N))} features are NaN or infinite")
  if x_N.size and (x_N.min() < 0 or x_N.max() > 1):
    raise DataFormatError(
      path,
      f"features span [{x_N.min():g}, {x_N.max():g}], expected [0, 1] "
      "(Purchase-100 features are binary)",
    )


def to_unit_float(images_NHWC: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1] (divide by 255, no other normalisation)."""
  out_NHWC = images_NHWC.astype(np.float32)
  np.divide(out_NHWC, np.float32(255), out=out_NHWC)
  return out_NHWC
