"""`load(name)`: the data sets of the paper by name, from `data_dir` or the first source with them.

Shapes: N examples, H height, W width, C channels, D features.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from jaxshape.data import cifar10
from jaxshape.data import fashion_mnist
from jaxshape.data import purchase100
from jaxshape.data import sources
from jaxshape.data import two_moons
from jaxshape.data.dataset import DataFormatError
from jaxshape.data.dataset import DataNotFoundError
from jaxshape.data.dataset import Dataset
from jaxshape.data.dataset import to_unit_float

__all__ = [
  "DATASETS",
  "load",
]

DATASETS = ("fashion_mnist", "fashion_mnist_3_4", "cifar10", "purchase100", "two_moons")

_log = logging.getLogger(__name__)

_TFDS_HOW_TO = (
  "  - tensorflow-datasets: downloads it on first use where the machine has internet "
  "(download=True, the default)"
)
_FASHION_MNIST_HOW_TO = "\n".join(
  [
    "To get it, any one of:",
    "  - `make data` (installs Debian's dataset-fashion-mnist where apt is usable as root)",
    "  - data_dir= / --data_dir: a folder with the four files of Zalando's release "
    f"({', '.join(s + '.gz' for s in fashion_mnist.IDX_FILES.values())}; gzipped or "
    "unpacked; https://github.com/zalandoresearch/fashion-mnist)",
    _TFDS_HOW_TO,
  ]
)
_CIFAR10_HOW_TO = "\n".join(
  [
    "To get it, any one of:",
    "  - data_dir= / --data_dir: the cifar-10-batches-py folder of the CIFAR-10 python "
    "release (extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html), "
    "or its parent folder",
    _TFDS_HOW_TO,
  ]
)


def load(
  name: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  seed: int = 0,
  download: bool = True,
) -> Dataset:
  """Loads a data set of the paper as numpy arrays.

  An explicit `data_dir` is the only place looked: its files (or a copy
  tensorflow-datasets prepared inside it), never another source, so a run
  never silently trains on other data than the user named. Without one:
  for FashionMNIST the Debian package's copy in
  /usr/share/datasets/fashion-mnist, then, for FashionMNIST and CIFAR-10,
  tensorflow-datasets (`tfds.data_source`, in tfds' folder: `TFDS_DATA_DIR`
  or ~/tensorflow_datasets; downloaded when `download`). Purchase-100 comes
  only from a user's file; two moons is generated. `Dataset.source` says
  where the data came from (write it into the experiment's config.json).

  | name                | train  | holdout | test   | input    | classes |
  |---------------------|--------|---------|--------|----------|---------|
  | "fashion_mnist"     | 60,000 |         | 10,000 | 28x28x1  | 10      |
  | "fashion_mnist_3_4" | 10,800 | 1,200   | 2,000  | 28x28x1  | 2       |
  | "cifar10"           | 50,000 |         | 10,000 | 32x32x3  | 10      |
  | "purchase100"       | 10,000 |         | 10,000 | D (600)  | 100     |
  | "two_moons"         | 700    |         | 300    | 2        | 2       |

  Images and features are float32 in [0, 1] (pixels / 255), labels int32.

  Args:
    name: one of `DATASETS`.
    data_dir: a folder holding the data (FashionMNIST: the IDX files or a
      fashion-mnist/ sub-folder; CIFAR-10: cifar-10-batches-py/ or that
      folder; Purchase-100: the .npz or CSV file, or a folder holding one).
    seed: seeds the random parts: FashionMNIST-3/4's train / held-out split,
      the draw of Purchase-100 records from its CSV release, the two moons.
    download: whether tensorflow-datasets may download data.

  Returns:
    A `Dataset`.

  Raises:
    ValueError: an unknown `name`, a bad `seed`, `download` or `data_dir`, or a
      `data_dir` for two_moons.
    DataNotFoundError: (a FileNotFoundError) no source has the data (with
      `data_dir`: the folder is missing, not a folder, or lacks files); the
      message names every place looked and how to get the data.
    DataFormatError: (a ValueError) a data file is corrupt, truncated or
      malformed, or a data file's name is taken by a folder; the message
      names the file and the problem.

  Example:
    >>> ds = load("fashion_mnist_3_4", seed=0)  # doctest: +SKIP
    >>> ds.x_train.shape, ds.x_holdout.shape, ds.x_test.shape  # doctest: +SKIP
    ((10800, 28, 28, 1), (1200, 28, 28, 1), (2000, 28, 28, 1))

  References:
    Hong et al. (2020), "On the Effectiveness of Mitigating Data Poisoning
    Attacks with Gradient Shaping": §3.2 / §6.2 (FashionMNIST-3/4), §6.1 /
    §6.3 (FashionMNIST, CIFAR-10, Purchase-100), Appendix D (two moons).
  """
  if name not in DATASETS:
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
  if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
    raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
  seed = int(seed)
  if not isinstance(download, bool):
    raise ValueError(f"download must be True or False, got {download!r}")
  if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
    raise ValueError(f"data_dir must be a path (str or os.PathLike) or None, got {data_dir!r}")
  data_dir = Path(data_dir).expanduser() if data_dir is not None else None

  if name == "two_moons":
    if data_dir is not None:
      raise ValueError(
        f"data_dir={os.fspath(data_dir)!r} given for two_moons, which is generated, "
        "not read from files; pass data_dir=None"
      )
    x_train, y_train, x_test, y_test = two_moons.split_two_moons(seed=seed)
    return Dataset(name, x_train, y_train, x_test, y_test, 2, source="generated")
  if name == "purchase100":
    return _load_purchase100(data_dir, seed)
  if name == "cifar10":
    (x_train, y_train, x_test, y_test), source = _find_cifar10(data_dir, download)
    return Dataset(
      name,
      to_unit_float(x_train),
      y_train,
      to_unit_float(x_test),
      y_test,
      10,
      class_names=cifar10.CLASS_NAMES,
      source=source,
    )
  arrays, source = _find_fashion_mnist(data_dir, download)
  if name == "fashion_mnist":
    x_train, y_train, x_test, y_test = arrays
    return Dataset(
      name,
      to_unit_float(x_train),
      y_train,
      to_unit_float(x_test),
      y_test,
      10,
      class_names=fashion_mnist.CLASS_NAMES,
      source=source,
    )
  split = fashion_mnist.split_3_4(arrays, seed=seed)
  return Dataset(
    name,
    to_unit_float(split["x_train"]),
    split["y_train"],
    to_unit_float(split["x_test"]),
    split["y_test"],
    2,
    x_holdout=to_unit_float(split["x_holdout"]),
    y_holdout=split["y_holdout"],
    class_names=fashion_mnist.CLASS_NAMES_3_4,
    source=source,
  )


def _find_fashion_mnist(data_dir: Path | None, download: bool):
  if data_dir is not None:
    files, reason = fashion_mnist.find_idx_files(data_dir)
    if files is not None:
      return fashion_mnist.read_idx_files(files), str(files["train_images"].parent)
    how_to = _FASHION_MNIST_HOW_TO
    return _from_data_dir_tfds("fashion_mnist", (28, 28, 1), data_dir, reason, how_to)
  system_dir = sources.SYSTEM_FASHION_MNIST_DIR
  files, reason = fashion_mnist.find_idx_files(system_dir)
  if files is not None:
    return fashion_mnist.read_idx_files(files), str(files["train_images"].parent)
  looked = [f"{system_dir} (Debian package dataset-fashion-mnist): {reason}"]
  return _from_tfds("fashion_mnist", (28, 28, 1), download, looked, _FASHION_MNIST_HOW_TO)


def _find_cifar10(data_dir: Path | None, download: bool):
  if data_dir is not None:
    folder, reason = cifar10.find_batches_folder(data_dir)
    if folder is not None:
      return cifar10.read_batches_folder(folder), str(folder)
    return _from_data_dir_tfds("cifar10", (32, 32, 3), data_dir, reason, _CIFAR10_HOW_TO)
  return _from_tfds("cifar10", (32, 32, 3), download, [], _CIFAR10_HOW_TO)


def _from_data_dir_tfds(tfds_name, image_shape, data_dir, reason, how_to):
  """The data set as tensorflow-datasets prepared it inside `data_dir`, and nothing else.

  An explicit `data_dir` is the only place looked: no system copy, no
  download (a user who names a folder must not silently train on other data).
  """
  prepared = data_dir / tfds_name
  if sources.is_prepared(prepared):
    try:
      arrays = sources.load_tfds(
        tfds_name, image_shape=image_shape, num_classes=10, data_dir=data_dir, download=False
      )
    except sources.TfdsUnavailableError as e:
      raise DataFormatError(prepared, f"tensorflow-datasets could not read it ({e})") from e
    return arrays, f"tfds:{tfds_name} ({data_dir})"
  title = {"fashion_mnist": "FashionMNIST", "cifar10": "CIFAR-10"}[tfds_name]
  looked = [
    f"data_dir {data_dir}: {reason}",
    f"data_dir {data_dir}: no data set prepared by tensorflow-datasets in {prepared}",
  ]
  message = _not_found_message(title, looked, how_to)
  raise DataNotFoundError(
    message + "\nAn explicit data_dir is the only place looked (no system copy, no download); "
    "omit data_dir to use those, or set TFDS_DATA_DIR for tensorflow-datasets' folder."
  )


def _from_tfds(tfds_name, image_shape, download, looked, how_to):
  """The arrays from tensorflow-datasets' own folder, or DataNotFoundError listing `looked`."""
  try:
    arrays = sources.load_tfds(
      tfds_name, image_shape=image_shape, num_classes=10, data_dir=None, download=download
    )
  except sources.TfdsUnavailableError as e:
    looked.append(
      f"tensorflow-datasets {tfds_name!r} in {sources.tfds_data_dir(None)} "
      f"(download={download}): {e}"
    )
    title = {"fashion_mnist": "FashionMNIST", "cifar10": "CIFAR-10"}[tfds_name]
    raise DataNotFoundError(_not_found_message(title, looked, how_to)) from None
  if looked:
    _log.warning("Loading %s from tensorflow-datasets; not found in: %s", tfds_name, looked)
  return arrays, f"tfds:{tfds_name} ({sources.tfds_data_dir(None)})"


def _load_purchase100(data_dir: Path | None, seed: int) -> Dataset:
  if data_dir is None:
    looked = ["no data_dir given (Purchase-100 has no system copy and no tfds source)"]
    raise DataNotFoundError(_not_found_message("Purchase-100", looked, purchase100.HOW_TO_GET))
  path, reason = purchase100.find_file(data_dir)
  if path is None:
    looked = [f"data_dir {data_dir}: {reason}"]
    raise DataNotFoundError(_not_found_message("Purchase-100", looked, purchase100.HOW_TO_GET))
  x_train, y_train, x_test, y_test = purchase100.read_file(path, seed=seed)
  return Dataset(
    "purchase100", x_train, y_train, x_test, y_test, purchase100.NUM_CLASSES, source=str(path)
  )


def _not_found_message(title: str, looked: list[str], how_to: str) -> str:
  lines = [f"{title} was not found. Looked in:"]
  lines += [f"  - {place}" for place in looked]
  return "\n".join(lines) + "\n" + how_to
