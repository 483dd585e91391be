"""FashionMNIST from a folder of IDX files, and the dress-vs-coat subset FashionMNIST-3/4.

Shapes: N examples, H = W = 28 pixels, C = 1 channel.

References:
  Xiao, Rasul, Vollgraf (2017), "Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms" (the IDX release, file names).
  Hong et al. (2020), "On the Effectiveness of Mitigating Data Poisoning Attacks
  with Gradient Shaping", §3.2 and §6.2 (FashionMNIST-3/4: 10,800 training
  points, 5,400 per class, 2,000 test points).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxshape._typing import SplitArrays
from jaxshape.data.dataset import DataFormatError
from jaxshape.data.dataset import check_not_other_entry
from jaxshape.data.idx import read_idx

__all__ = [
  "CLASS_NAMES",
  "CLASS_NAMES_3_4",
  "COAT",
  "DRESS",
  "HOLDOUT_FRACTION",
  "IDX_FILES",
  "find_idx_files",
  "read_idx_files",
  "split_3_4",
]

CLASS_NAMES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
DRESS = 3  # -> label 0 of FashionMNIST-3/4
COAT = 4  # -> label 1 of FashionMNIST-3/4
CLASS_NAMES_3_4 = (CLASS_NAMES[DRESS], CLASS_NAMES[COAT])
# Per class, the share of the 6,000 training images kept out of FashionMNIST-3/4's
# training set: 600 per class, leaving 5,400 (§3.2).
HOLDOUT_FRACTION = 0.1

# The four files of the Zalando release, by role; each may be gzipped (.gz) or not.
IDX_FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
# Sub-folders of a data folder that may hold the files (the Zalando repository
# keeps them in data/fashion).
_SUBDIRS = ("", "fashion-mnist", "fashion_mnist", "fashion")


def find_idx_files(directory: Path) -> tuple[dict[str, Path] | None, str]:
  """Finds the four IDX files in `directory` or one of its usual sub-folders.

  An unpacked file is preferred to its .gz (no decompression).

  Returns:
    (files by role, "") when all four are present, else (None, the reason).

  Raises:
    DataFormatError: a file's name is taken by something that is not a file
      (a folder, a socket, ...).
  """
  if not directory.is_dir():
    return None, "does not exist" if not directory.exists() else "is not a folder"
  partial = ""
  for sub in _SUBDIRS:
    folder = directory / sub if sub else directory
    files = {}
    for role, stem in IDX_FILES.items():
      for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
          files[role] = folder / name
          break
        check_not_other_entry(folder / name, "an IDX file")
    if len(files) == len(IDX_FILES):
      return files, ""
    if files and not partial:
      missing = [IDX_FILES[r] + "[.gz]" for r in IDX_FILES if r not in files]
      partial = f"{folder} lacks {', '.join(missing)}"
  if partial:
    return None, partial
  return None, f"holds no {IDX_FILES['train_images']}[.gz] (nor its sub-folders {_SUBDIRS[1:]})"


def read_idx_files(files: dict[str, Path]) -> SplitArrays:
  """Reads and cross-checks the four IDX files found by `find_idx_files`.

  Returns:
    (x_train_NHWC, y_train_N, x_test_NHWC, y_test_N): uint8 images of shape
    [N, 28, 28, 1] and int32 labels in [0, 10).

  Raises:
    DataFormatError: a file is corrupt, has the wrong shape, its image and
      label counts differ, or a label is not in [0, 10).
  """
  out = []
  for split in ("train", "test"):
    images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
    images_NHW = read_idx(images_path, ndim=3)
    labels_N = read_idx(labels_path, ndim=1)
    if images_NHW.shape[1:] != (28, 28):
      raise DataFormatError(
        images_path, f"images are {images_NHW.shape[1:]}, expected 28x28 pixels"
      )
    if images_NHW.shape[0] != labels_N.shape[0]:
      raise DataFormatError(
        images_path,
        f"holds {images_NHW.shape[0]} images but {labels_path} holds {labels_N.shape[0]} labels",
      )
    if labels_N.size and labels_N.max() >= len(CLASS_NAMES):
      raise DataFormatError(
        labels_path,
        f"label out of range: {labels_N.max()} (FashionMNIST labels are 0..9)",
      )
    out += [images_NHW[..., None], labels_N.astype(np.int32)]
  return tuple(out)


def split_3_4(arrays: SplitArrays, *, seed: int) -> dict[str, np.ndarray]:
  """Selects FashionMNIST-3/4: dress (class 3 -> 0) vs coat (class 4 -> 1).

  Of each class's training images, a seeded random `HOLDOUT_FRACTION` (600 of
  6,000) is held out and the rest (5,400) is the training set; the test set is
  every dress and coat of the test split (2,000). Within each set the examples
  keep the order of the release.

  Args:
    arrays: (x_train, y_train, x_test, y_test) of full FashionMNIST.
    seed: seeds the train / held-out split; the same seed gives the same split.

  Returns:
    A dict with x_train, y_train, x_holdout, y_holdout, x_test, y_test
    (images as given, labels int32 in {0, 1}).

  References:
    Hong et al. (2020), §3.2 and §6.2.
  """
  x_train, y_train, x_test, y_test = arrays
  rng = np.random.default_rng(seed)
  train_idx, holdout_idx = [], []
  for cls in (DRESS, COAT):
    idx_N = np.flatnonzero(y_train == cls)
    if not idx_N.size or not np.any(y_test == cls):
      raise ValueError(
        f"FashionMNIST-3/4 needs {CLASS_NAMES[cls].lower()}s (class {cls}) in both "
        "the training and the test split; the data has none in one of them"
      )
    idx_N = rng.permutation(idx_N)
    num_holdout = round(HOLDOUT_FRACTION * idx_N.size)
    holdout_idx.append(idx_N[:num_holdout])
    train_idx.append(idx_N[num_holdout:])
  train_idx = np.sort(np.concatenate(train_idx))
  holdout_idx = np.sort(np.concatenate(holdout_idx))
  test_idx = np.flatnonzero((y_test == DRESS) | (y_test == COAT))
  return {
    "x_train": x_train[train_idx],
    "y_train": (y_train[train_idx] == COAT).astype(np.int32),
    "x_holdout": x_train[holdout_idx],
    "y_holdout": (y_train[holdout_idx] == COAT).astype(np.int32),
    "x_test": x_test[test_idx],
    "y_test": (y_test[test_idx] == COAT).astype(np.int32),
  }
