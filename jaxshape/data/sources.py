"""Where data comes from besides a user's folder: the system copy and tensorflow-datasets.

`jaxshape.data.load` tries, in order: the `data_dir` it is given, the Debian
package's FashionMNIST (`SYSTEM_FASHION_MNIST_DIR`), then tensorflow-datasets,
which downloads and prepares the data on first use where the machine has
internet. tensorflow-datasets is imported only here, lazily, and used through
`tfds.data_source`, which needs no TensorFlow.

Shapes: N examples, H height, W width, C channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxshape.data.dataset import DataFormatError

__all__ = [
  "SYSTEM_FASHION_MNIST_DIR",
  "TfdsUnavailableError",
  "load_tfds",
  "tfds_data_dir",
]

# Installed by Debian's dataset-fashion-mnist package (`make data` as root).
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class TfdsUnavailableError(RuntimeError):
  """tensorflow-datasets could not provide the data (not installed, offline, ...)."""


def tfds_data_dir(data_dir: str | os.PathLike[str] | None) -> str:
  """The folder tensorflow-datasets reads and writes: `data_dir` or its default."""
  if data_dir is not None:
    return os.fspath(data_dir)
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def load_tfds(
  name: str,
  *,
  image_shape: tuple[int, ...],
  num_classes: int,
  data_dir: str | os.PathLike[str] | None,
  download: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Reads an image classification data set through `tfds.data_source`.

  Args:
    name: the tensorflow-datasets name ("fashion_mnist", "cifar10").
    image_shape: the shape every image must have, e.g. (28, 28, 1).
    num_classes: labels must lie in [0, num_classes).
    data_dir: tensorflow-datasets' folder; None for its default.
    download: whether tensorflow-datasets may download and prepare the data.

  Returns:
    (x_train_NHWC, y_train_N, x_test_NHWC, y_test_N): uint8 images and int32
    labels, in the order tensorflow-datasets stores them.

  Raises:
    TfdsUnavailableError: tensorflow-datasets is missing or failed to provide
      the data; the message says why.
    DataFormatError: the data it provided has the wrong shape or labels.
  """
  root = tfds_data_dir(data_dir)
  if not download and not (Path(root) / name).is_dir():
    raise TfdsUnavailableError(f"not prepared in {Path(root) / name}, and download=False")
  try:
    import tensorflow_datasets as tfds  # lazy: importing it takes ~0.4 s
  except ImportError as e:
    raise TfdsUnavailableError(f"tensorflow-datasets is not importable ({e})") from e
  out = []
  for split in ("train", "test"):
    try:
      source = tfds.data_source(name, split=split, data_dir=root, download=download)
      examples = [source[i] for i in range(len(source))]
    except Exception as e:  # tfds raises many types (network, missing modules, ...)
      raise TfdsUnavailableError(f"{type(e).__name__}: {e}") from e
    where = f"tfds:{name}/{split}"
    if not examples:
      raise TfdsUnavailableError(f"the {split} split is empty")
    x_NHWC = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
    y_N = np.array([ex["label"] for ex in examples], np.int32)
    if x_NHWC.shape[1:] != image_shape:
      raise DataFormatError(where, f"images are {x_NHWC.shape[1:]}, expected {image_shape}")
    if y_N.min() < 0 or y_N.max() >= num_classes:
      raise DataFormatError(
        where,
        f"label out of range: labels span [{y_N.min()}, {y_N.max()}], expected [0, {num_classes})",
      )
    out += [x_NHWC, y_N]
  return tuple(out)
