"""CIFAR-10 from the "python version" release (the `cifar-10-batches-py` pickles).

Each batch file is a pickled dict with b"data", a uint8 array [N, 3072] whose
rows hold the red, green and blue 32x32 planes in turn (channel-first,
row-major), and b"labels", a list of N ints in [0, 10). The pickles are read
with an unpickler that only rebuilds numpy arrays and plain containers, so a
stray file cannot run code.

Shapes: N examples, H = W = 32 pixels, C = 3 channels, D = 3072 = C * H * W bytes.

References:
  Krizhevsky (2009), "Learning Multiple Layers of Features from Tiny Images".
  Hong et al. (2020), §6.3 (CNN on CIFAR-10: 50k training, 10k test images).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from jaxshape._typing import SplitArrays
from jaxshape.data.dataset import DataFormatError
from jaxshape.data.dataset import check_not_other_entry

__all__ = [
  "BATCH_FOLDER",
  "CLASS_NAMES",
  "TEST_BATCH",
  "TRAIN_BATCHES",
  "find_batches_folder",
  "read_batch",
  "read_batches_folder",
]

CLASS_NAMES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


# The globals a CIFAR-10 batch pickle may name: numpy's array reconstruction,
# under its NumPy 1 and NumPy 2 module names, and the codec that Python 3 uses to
# store bytes in protocol-2 pickles.
_ALLOWED_GLOBALS = (
  {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
  }
  | {(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")}
  | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
)


class _ArrayUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return super().find_class(module, name)


def find_batches_folder(directory: Path) -> tuple[Path | None, str]:
  """Finds the batch files in `directory` or in its `cifar-10-batches-py` sub-folder.

  Returns:
    (the folder, "") when all six batch files are present, else (None, the reason).

  Raises:
    DataFormatError: a batch file's name is taken by a folder (or other non-file).
  """
  if not directory.is_dir():
    return None, "does not exist" if not directory.exists() else "is not a folder"
  names = (*TRAIN_BATCHES, TEST_BATCH)
  for folder in (directory, directory / BATCH_FOLDER):
    for n in names:
      check_not_other_entry(folder / n, "a CIFAR-10 batch file")
    present = [n for n in names if (folder / n).is_file()]
    if len(present) == len(names):
      return folder, ""
    if present:
      missing = [n for n in names if n not in present]
      return None, f"{folder} lacks {', '.join(missing)}"
  return None, f"holds neither {BATCH_FOLDER}/ nor the batch files {', '.join(names)}"


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads one batch file.

  Returns:
    (x_NHWC, y_N): uint8 images [N, 32, 32, 3] and int32 labels in [0, 10).

  Raises:
    DataFormatError: the file is not a CIFAR-10 batch pickle, or its data or
      labels have the wrong shape, count or range.
  """
  with open(path, "rb") as f:
    contents = f.read()  # reads from memory stay within the file's size
  try:
    batch = _ArrayUnpickler(io.BytesIO(contents), encoding="bytes").load()
  except Exception as e:  # damaged pickles fail in many ways (KeyError, LookupError, ...)
    raise DataFormatError(path, f"not a CIFAR-10 batch pickle ({type(e).__name__}: {e})") from e
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    raise DataFormatError(path, "not a CIFAR-10 batch: expected a dict with b'data', b'labels'")
  data_ND = np.asarray(batch[b"data"])
  labels_N = np.asarray(batch[b"labels"])
  if data_ND.dtype != np.uint8 or data_ND.ndim != 2 or data_ND.shape[1] != 3 * 32 * 32:
    raise DataFormatError(
      path, f"b'data' is {data_ND.dtype} {data_ND.shape}, expected uint8 [N, 3072]"
    )
  if labels_N.ndim != 1 or labels_N.dtype.kind not in "iu":
    raise DataFormatError(path, "b'labels' is not a list of integers")
  if labels_N.shape[0] != data_ND.shape[0]:
    raise DataFormatError(path, f"holds {data_ND.shape[0]} images but {labels_N.shape[0]} labels")
  if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= len(CLASS_NAMES)):
    raise DataFormatError(
      path,
      f"label out of range: labels span [{labels_N.min()}, {labels_N.max()}], expected 0..9",
    )
  x_NHWC = np.ascontiguousarray(data_ND.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return x_NHWC, labels_N.astype(np.int32)


def read_batches_folder(folder: Path) -> SplitArrays:
  """Reads the five training batches and the test batch.

  Returns:
    (x_train_NHWC, y_train_N, x_test_NHWC, y_test_N), uint8 images and int32 labels.
  """
  train = [read_batch(folder / name) for name in TRAIN_BATCHES]
  x_test, y_test = read_batch(folder / TEST_BATCH)
  x_train = np.concatenate([x for x, _ in train])
  y_train = np.concatenate([y for _, y in train])
  return x_train, y_train, x_test, y_test
