"""Purchase-100 from a user's file: the paper's `.npz` or Shokri et al.'s CSV release.

Two formats are read:
- an `.npz` with `arr_0..arr_3` = x_train [N, D], y_train [N], x_test, y_test
  (the format of the paper's code; labels 0..99, or one-hot [N, 100]);
- the comma-separated release (`dataset_purchase`): one record per line, the
  class (1..100) first, then the binary purchase features; 10,000 training and
  10,000 test records are drawn from it at random (seeded, disjoint).

Shapes: N records, D features, F = 1 + D columns of the CSV.

References:
  Shokri, Stronati, Song, Shmatikov (2017), "Membership Inference Attacks
  Against Machine Learning Models" (the data set).
  Hong et al. (2020), §6.1 and §6.3 (10k random training records, 10k random
  non-training test records; LR and MLP).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from jaxshape._typing import SplitArrays
from jaxshape.data import npz
from jaxshape.data.dataset import DataFormatError
from jaxshape.data.dataset import check_labels
from jaxshape.data.dataset import check_not_other_entry
from jaxshape.data.dataset import check_unit_features

__all__ = [
  "FILE_NAMES",
  "HOW_TO_GET",
  "NUM_CLASSES",
  "NUM_TEST",
  "NUM_TRAIN",
  "find_file",
  "read_csv",
  "read_file",
  "read_npz",
]

NUM_CLASSES = 100
NUM_TRAIN = 10_000
NUM_TEST = 10_000
# File names looked for in a data folder (and its purchase100/ sub-folder).
FILE_NAMES = (
  "purchase100.npz",
  "purchase_100.npz",
  "purchase.npz",
  "dataset_purchase",
  "dataset_purchase.csv",
  "purchase100.csv",
)
HOW_TO_GET = "\n".join(
  [
    "Purchase-100 cannot be downloaded automatically. To get it:",
    "  - take Shokri et al.'s release (the data sets of 'Membership Inference Attacks Against "
    "Machine Learning Models', the 'privacy' datasets repository): the file `dataset_purchase`, "
    "comma-separated, one record per line, class 1..100 then 600 binary features; "
    f"{NUM_TRAIN:,} training and {NUM_TEST:,} test records are drawn from it at random (seed=);",
    "  - or the gradient-shaping paper's authors' `purchase100.npz` (arr_0..arr_3 = x_train, "
    "y_train, x_test, y_test; labels 0..99);",
    "  - pass the file, or a folder holding it under one of the names "
    f"{', '.join(FILE_NAMES)}, as data_dir= / --data_dir.",
  ]
)


def find_file(data_dir: Path) -> tuple[Path | None, str]:
  """Returns (`data_dir` itself if it is a file, else the first known file name in it, "").

  Returns (None, the reason) when there is none.

  Raises:
    DataFormatError: a known file name is taken by a folder (or other non-file).
  """
  if data_dir.is_file():
    return data_dir, ""
  if not data_dir.is_dir():
    return None, "does not exist" if not data_dir.exists() else "is neither a file nor a folder"
  for folder in (data_dir, data_dir / "purchase100"):
    for name in FILE_NAMES:
      if (folder / name).is_file():
        return folder / name, ""
      check_not_other_entry(folder / name, "a Purchase-100 file")
  return None, f"holds none of {', '.join(FILE_NAMES)} (nor purchase100/ with one of them)"


def read_file(path: Path, *, seed: int) -> SplitArrays:
  """Reads an `.npz` (a `.npz` name or a zip signature) or a CSV release file.

  Args:
    path: the file.
    seed: seeds the random train / test split of a CSV file (an .npz is
      already split).

  Returns:
    (x_train_ND, y_train_N, x_test_ND, y_test_N): float32 features in [0, 1]
    and int32 labels in [0, 100).

  Raises:
    DataFormatError: the file is damaged or malformed (see `read_npz`,
      `read_csv`); the message names it.
  """
  try:
    looks_like_npz = path.suffix == ".npz" or npz.is_zip(path)
  except OSError as e:
    raise DataFormatError(path, f"cannot be read ({e})") from e
  if looks_like_npz:
    return read_npz(path)
  return read_csv(path, seed=seed)


def read_npz(path: Path) -> SplitArrays:
  """Reads an `.npz` with arr_0..arr_3 = x_train, y_train, x_test, y_test.

  Raises:
    DataFormatError: a truncated or corrupt archive, missing arrays,
      mismatched shapes, labels outside [0, 100), NaN or features outside
      [0, 1].
  """
  arrays = npz.read_npz(path)
  missing = [k for k in ("arr_0", "arr_1", "arr_2", "arr_3") if k not in arrays]
  if missing:
    raise DataFormatError(
      path,
      f"lacks {', '.join(missing)} (has {', '.join(arrays) or 'nothing'}); "
      "expected arr_0..arr_3 = x_train, y_train, x_test, y_test",
    )
  x_train, y_train, x_test, y_test = (arrays[f"arr_{i}"] for i in range(4))
  out = []
  for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
    if x.ndim != 2 or x_train.ndim != 2:
      raise DataFormatError(path, f"x_{split} has shape {x.shape}, expected [N, D]")
    if x.shape[1] != x_train.shape[1]:
      raise DataFormatError(
        path, f"x_train has {x_train.shape[1]} features but x_test {x.shape[1]}"
      )
    y = _from_one_hot(y, path)
    if y.shape[:1] != x.shape[:1]:
      raise DataFormatError(
        path, f"x_{split} holds {x.shape[0]} records but y_{split} {y.shape[0]} labels"
      )
    check_unit_features(x, path)
    out += [x.astype(np.float32), check_labels(y, NUM_CLASSES, path)]
  return tuple(out)


def _from_one_hot(y: np.ndarray, path: Path) -> np.ndarray:
  if y.ndim == 2 and y.shape[1] == NUM_CLASSES:
    if not np.all((y == 0) | (y == 1)) or not np.all(y.sum(axis=1) == 1):
      raise DataFormatError(path, "2-D labels are not one-hot rows")
    return np.argmax(y, axis=1)
  return y


def read_csv(
  path: Path, *, seed: int, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST
) -> SplitArrays:
  """Reads the CSV release and draws disjoint random training and test records.

  Args:
    path: the file; one record per line: class 1..100, then the features.
    seed: seeds which records are drawn; the same seed gives the same split.
    num_train: training records (10,000 in the paper).
    num_test: test records, none of them a training record (10,000).

  Returns:
    (x_train_ND, y_train_N, x_test_ND, y_test_N), labels mapped to 0..99.

  Raises:
    DataFormatError: unparsable or ragged lines, a class outside 1..100, NaN or
      features outside [0, 1], or fewer than num_train + num_test records.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "loadtxt: input contained no data")  # raised below
    try:
      # Integers parse twice as fast; anything else (fractions, NaN) is parsed as floats.
      table_NF = np.loadtxt(path, delimiter=",", dtype=np.int16, ndmin=2)
    except ValueError:
      try:
        table_NF = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
      except ValueError as e:
        raise DataFormatError(path, f"not a comma-separated table of numbers ({e})") from e
  if table_NF.shape[0] == 0:
    raise DataFormatError(path, "holds no records")
  num_records = table_NF.shape[0]
  if table_NF.shape[1] < 2:
    raise DataFormatError(path, "expected a class and at least one feature per line")
  classes_N = table_NF[:, 0].astype(np.float32)
  if np.all(np.isfinite(classes_N)) and (classes_N.min() < 1 or classes_N.max() > NUM_CLASSES):
    raise DataFormatError(
      path,
      f"label out of range: the first column spans [{classes_N.min():g}, "
      f"{classes_N.max():g}], expected classes 1..{NUM_CLASSES}",
    )
  y_N = check_labels(classes_N - 1, NUM_CLASSES, path)
  x_ND = table_NF[:, 1:]
  check_unit_features(x_ND, path)
  if num_records < num_train + num_test:
    raise DataFormatError(
      path,
      f"holds {num_records} records; {num_train} training + {num_test} test records "
      "are drawn from it",
    )
  idx = np.random.default_rng(seed).permutation(num_records)
  train_idx, test_idx = idx[:num_train], idx[num_train : num_train + num_test]
  x_train_ND = x_ND[train_idx].astype(np.float32)
  x_test_ND = x_ND[test_idx].astype(np.float32)
  return x_train_ND, y_N[train_idx], x_test_ND, y_N[test_idx]
