"""Where data comes from besides a user's folder: the system copy and tensorflow-datasets.

Without a `data_dir`, `jaxshape.data.load` tries, in order: the Debian
package's FashionMNIST (`SYSTEM_FASHION_MNIST_DIR`), then tensorflow-datasets,
which downloads and prepares the data on first use where the machine has
internet. With a `data_dir`, only that folder (and a copy tfds prepared in it)
is read. tensorflow-datasets is imported only here, lazily, and used through
`tfds.data_source`, which needs no TensorFlow.

Shapes: N examples, H height, W width, C channels.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from jaxshape.data.dataset import DataFormatError

__all__ = [
  "DOWNLOAD_HOSTS",
  "SYSTEM_FASHION_MNIST_DIR",
  "TfdsUnavailableError",
  "is_prepared",
  "load_tfds",
  "network_reachable",
  "tfds_data_dir",
]

# Installed by Debian's dataset-fashion-mnist package (`make data` as root).
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# Where tensorflow-datasets downloads from: its bucket of prepared data, then the
# data set's own server. One reachable host is enough to try a download.
DOWNLOAD_HOSTS = {
  "fashion_mnist": (
    ("storage.googleapis.com", 443),
    ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
  ),
  "cifar10": (("storage.googleapis.com", 443), ("www.cs.toronto.edu", 443)),
}
# Seconds each DNS lookup and each connection attempt of the probe may take.
PROBE_TIMEOUT = 3.0


class TfdsUnavailableError(RuntimeError):
  """tensorflow-datasets could not provide the data (not installed, offline, ...)."""


def _proxy_for(host: str, port: int) -> tuple[str, int] | None:
  """The (host, port) of the proxy that `urllib` would use for `host`, if any."""
  if urllib.request.proxy_bypass(host):
    return None
  proxies = urllib.request.getproxies()
  url = proxies.get("https" if port == 443 else "http") or proxies.get("all")
  if not url:
    return None
  parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
  if not parsed.hostname:
    return None
  return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def _connect(host: str, port: int, timeout: float) -> str | None:
  """None when a TCP connection to host:port opens within `timeout`, else why not.

  `socket.getaddrinfo` has no timeout of its own, so the lookup runs in a
  daemon thread that is abandoned when it takes longer.
  """
  found: dict[str, object] = {}

  def resolve():
    try:
      found["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
      found["error"] = e

  thread = threading.Thread(target=resolve, name=f"probe {host}", daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    return f"{host}: DNS lookup gave no answer within {timeout:g} s"
  if "error" in found:
    return f"{host}: DNS lookup failed ({found['error']})"
  error: OSError | None = None
  for family, kind, proto, _, address in found["addresses"]:
    try:
      with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
      return None
    except OSError as e:
      error = e
  return f"{host}:{port}: no connection ({error})"


def network_reachable(
  hosts: tuple[tuple[str, int], ...], timeout: float = PROBE_TIMEOUT
) -> tuple[bool, str]:
  """Whether any of `hosts` (through the environment's proxy, if set) accepts a connection.

  A quick check before a tensorflow-datasets download: offline, tfds retries
  its DNS lookups for minutes before giving up; this answers in seconds.

  Returns:
    (True, "") on the first host that connects, else (False, why each failed).
  """
  reasons = []
  for host, port in hosts:
    proxy = _proxy_for(host, port)
    target = proxy if proxy is not None else (host, port)
    reason = _connect(*target, timeout)
    if reason is None:
      return True, ""
    reasons.append(reason if proxy is None else f"proxy for {host}: {reason}")
  return False, "; ".join(reasons)


def tfds_data_dir(data_dir: str | os.PathLike[str] | None) -> str:
  """The folder tensorflow-datasets reads and writes: `data_dir` or its default."""
  if data_dir is not None:
    return os.fspath(data_dir)
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def is_prepared(folder: Path) -> bool:
  """Whether tfds finished preparing a data set in `folder` (`<version>/dataset_info.json`).

  An interrupted or failed download leaves an empty `folder` behind, which is
  not prepared data.
  """
  return folder.is_dir() and any(folder.glob("**/dataset_info.json"))


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
      the data, or the data must be downloaded and none of its download hosts
      answers (`network_reachable`, a few seconds); the message says why.
    DataFormatError: the data it provided has the wrong shape or labels.
  """
  root = tfds_data_dir(data_dir)
  prepared = is_prepared(Path(root) / name)
  if not download and not prepared:
    raise TfdsUnavailableError(f"not prepared in {Path(root) / name}, and download=False")
  if download and not prepared and name in DOWNLOAD_HOSTS:
    # Fail in seconds rather than after minutes of tfds' DNS retries.
    reachable, reason = network_reachable(DOWNLOAD_HOSTS[name])
    if not reachable:
      raise TfdsUnavailableError(
        f"not prepared in {Path(root) / name}, and the network is unreachable, so "
        f"download=True cannot fetch it ({reason})"
      )
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
