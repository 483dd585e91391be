"""Tests jaxshape/data: `load` for every data set, its sources and their order, the
FashionMNIST-3/4 split, tfds under mock data, CIFAR-10 pickles, Purchase-100 files, two
moons, and the errors on missing or bad data."""

import ast
import gzip
import pickle
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxshape import data
from jaxshape.data import DataFormatError
from jaxshape.data import DataNotFoundError
from jaxshape.data import fashion_mnist
from jaxshape.data import make_two_moons
from jaxshape.data import sources

# ----------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray) -> Path:
  contents = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  contents += array.astype(np.uint8).tobytes()
  path.write_bytes(
    gzip.compress(contents, compresslevel=1, mtime=0) if path.suffix == ".gz" else contents
  )
  return path


def tagged_images(classes: np.ndarray) -> np.ndarray:
  """28x28 images whose first pixels hold the class and the index: (class, i // 256, i % 256)."""
  images = np.zeros((classes.size, 28, 28), np.uint8)
  index = np.arange(classes.size)
  images[:, 0, 0] = classes
  images[:, 0, 1] = index // 256
  images[:, 0, 2] = index % 256
  return images


def write_fashion_mnist(folder: Path, y_train, y_test, *, gz: bool) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  suffix = ".gz" if gz else ""
  for stem, labels in (("train", y_train), ("t10k", y_test)):
    labels = np.asarray(labels, np.uint8)
    write_idx(folder / f"{stem}-images-idx3-ubyte{suffix}", tagged_images(labels))
    write_idx(folder / f"{stem}-labels-idx1-ubyte{suffix}", labels)
  return folder


def tiny_labels(n, seed=0):
  return np.random.default_rng(seed).permutation(np.arange(n) % 10)


def decode_tags(x_NHWC):
  pixels = np.round(x_NHWC[:, 0, :3, 0] * 255).astype(np.int64)
  return pixels[:, 0], pixels[:, 1] * 256 + pixels[:, 2]


def listing(folder: Path):
  return sorted((p.relative_to(folder), p.stat().st_size) for p in folder.rglob("*"))


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
  """Hides Debian's FashionMNIST so that other sources are exercised."""
  monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-system-copy")


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory):
  """A few dozen images in the release's gzipped format."""
  folder = tmp_path_factory.mktemp("tiny") / "fashion-mnist"
  return write_fashion_mnist(folder, tiny_labels(60), tiny_labels(30, seed=1), gz=True)


@pytest.fixture(scope="module")
def fmnist_3_4(tmp_path_factory):
  """12,000 training images of classes 3 and 4 (and 80 of others), 2,000 (+ 40) test ones."""
  rng = np.random.default_rng(0)
  others = [0, 1, 2, 5, 6, 7, 8, 9]
  y_train = rng.permutation(np.concatenate([np.repeat([3, 4], 6000), np.repeat(others, 10)]))
  y_test = rng.permutation(np.concatenate([np.repeat([3, 4], 1000), np.repeat(others, 5)]))
  folder = write_fashion_mnist(tmp_path_factory.mktemp("fm34"), y_train, y_test, gz=False)
  return folder, y_train, y_test


# ------------------------------------------------------------------- FashionMNIST (IDX)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip(tmp_path, no_system_copy, gz):
  y_train, y_test = tiny_labels(40), tiny_labels(20, seed=1)
  folder = write_fashion_mnist(tmp_path, y_train, y_test, gz=gz)
  ds = data.load("fashion_mnist", data_dir=folder)
  assert ds.name == "fashion_mnist" and ds.num_classes == 10 and ds.source == str(folder)
  assert ds.x_train.shape == (40, 28, 28, 1) and ds.x_test.shape == (20, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.x_holdout is None and ds.y_holdout is None
  np.testing.assert_array_equal(ds.y_train, y_train)
  np.testing.assert_array_equal(ds.y_test, y_test)
  np.testing.assert_array_equal(ds.x_train[..., 0], tagged_images(y_train) / np.float32(255))
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert ds.class_names[3] == "Dress" and ds.input_shape == (28, 28, 1)


def test_fashion_mnist_found_in_subfolder_of_data_dir(tiny_fmnist, no_system_copy):
  ds = data.load("fashion_mnist", data_dir=tiny_fmnist.parent)
  assert ds.source == str(tiny_fmnist) and ds.x_train.shape[0] == 60


def test_arrays_are_read_only(tiny_fmnist):
  ds = data.load("fashion_mnist", data_dir=tiny_fmnist)
  with pytest.raises(ValueError, match="read-only"):
    ds.x_train[0, 0, 0, 0] = 1.0
  assert "x_train=float32[60, 28, 28, 1]" in repr(ds)


def test_fashion_mnist_3_4_split(fmnist_3_4):
  folder, y_train_full, y_test_full = fmnist_3_4
  ds = data.load("fashion_mnist_3_4", data_dir=folder, seed=0)
  assert ds.num_classes == 2 and ds.class_names == ("Dress", "Coat")
  assert ds.x_train.shape == (10_800, 28, 28, 1)
  assert ds.x_holdout.shape == (1_200, 28, 28, 1)
  assert ds.x_test.shape == (2_000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.y_train), [5_400, 5_400])
  np.testing.assert_array_equal(np.bincount(ds.y_holdout), [600, 600])
  np.testing.assert_array_equal(np.bincount(ds.y_test), [1_000, 1_000])
  # Images stay with their labels: dress (3) -> 0, coat (4) -> 1.
  train_cls, train_idx = decode_tags(ds.x_train)
  hold_cls, hold_idx = decode_tags(ds.x_holdout)
  test_cls, test_idx = decode_tags(ds.x_test)
  np.testing.assert_array_equal(train_cls, ds.y_train + 3)
  np.testing.assert_array_equal(hold_cls, ds.y_holdout + 3)
  np.testing.assert_array_equal(test_cls, ds.y_test + 3)
  # Train and held-out partition the 12,000 dresses and coats, in the release's order.
  assert not set(train_idx) & set(hold_idx)
  np.testing.assert_array_equal(
    np.sort(np.concatenate([train_idx, hold_idx])), np.flatnonzero(np.isin(y_train_full, [3, 4]))
  )
  assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(hold_idx) > 0)
  np.testing.assert_array_equal(test_idx, np.flatnonzero(np.isin(y_test_full, [3, 4])))


def test_fashion_mnist_3_4_split_is_deterministic(fmnist_3_4):
  folder = fmnist_3_4[0]
  first = data.load("fashion_mnist_3_4", data_dir=folder, seed=7)
  again = data.load("fashion_mnist_3_4", data_dir=folder, seed=7)
  other = data.load("fashion_mnist_3_4", data_dir=folder, seed=8)
  for field in ("x_train", "y_train", "x_holdout", "y_holdout", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
  assert not np.array_equal(decode_tags(first.x_holdout)[1], decode_tags(other.x_holdout)[1])
  np.testing.assert_array_equal(first.x_test, other.x_test)


def test_fashion_mnist_3_4_needs_both_classes(tmp_path):
  folder = write_fashion_mnist(tmp_path, np.repeat([0, 3], 10), np.repeat([3, 4], 5), gz=False)
  with pytest.raises(ValueError, match=r"coats \(class 4\)"):
    data.load("fashion_mnist_3_4", data_dir=folder)


# --------------------------------------------------------------------- source order


def test_data_dir_comes_before_system_copy(tmp_path, tiny_fmnist, monkeypatch):
  monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST_DIR", tiny_fmnist)
  mine = write_fashion_mnist(tmp_path / "mine", tiny_labels(10), tiny_labels(10), gz=True)
  assert data.load("fashion_mnist", data_dir=mine).source == str(mine)


def _missing(tmp_path):
  return tmp_path / "nowhere", DataNotFoundError, "nowhere: does not exist"


def _incomplete(tmp_path):
  folder = write_fashion_mnist(tmp_path / "mine", tiny_labels(10), tiny_labels(10), gz=True)
  (folder / "t10k-labels-idx1-ubyte.gz").unlink()
  return folder, DataNotFoundError, "mine lacks t10k-labels-idx1-ubyte\\[.gz\\]"


def _empty_file_among_files(tmp_path):
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # an incomplete folder
  return tmp_path, DataNotFoundError, "lacks train-labels-idx1-ubyte\\[.gz\\]"


def _a_file(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(b"not a folder")
  return path, DataNotFoundError, "train-images-idx3-ubyte.gz: is not a folder"


def _folder_where_a_file_should_be(tmp_path):
  folder = write_fashion_mnist(tmp_path / "mine", tiny_labels(10), tiny_labels(10), gz=True)
  (folder / "train-labels-idx1-ubyte.gz").unlink()
  (folder / "train-labels-idx1-ubyte.gz").mkdir()
  return folder, DataFormatError, "train-labels-idx1-ubyte.gz: is a folder, expected an IDX file"


@pytest.mark.parametrize(
  "make_data_dir",
  [_missing, _incomplete, _empty_file_among_files, _a_file, _folder_where_a_file_should_be],
)
@pytest.mark.parametrize("name", ["fashion_mnist", "fashion_mnist_3_4"])
def test_explicit_data_dir_is_never_replaced(
  tmp_path, tiny_fmnist, monkeypatch, name, make_data_dir
):
  # The system copy is present and tfds may download: neither is used instead of data_dir.
  monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST_DIR", tiny_fmnist)
  monkeypatch.setattr(sources, "network_reachable", lambda *a, **k: pytest.fail("probed"))
  data_dir, error, message = make_data_dir(tmp_path)
  with pytest.raises(error, match=message) as info:
    data.load(name, data_dir=data_dir, download=True)
  assert str(data_dir) in str(info.value)
  if error is DataNotFoundError:
    assert "only place looked" in str(info.value) and "make data" in str(info.value)


def test_without_data_dir_the_system_copy_is_the_source(tiny_fmnist, monkeypatch):
  monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST_DIR", tiny_fmnist)
  assert data.load("fashion_mnist").source == str(tiny_fmnist)


def test_no_data_anywhere_lists_places_and_remedies(tmp_path, no_system_copy, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  before = listing(tmp_path)
  with pytest.raises(DataNotFoundError) as info:
    data.load("fashion_mnist_3_4", download=False)
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert f"{sources.SYSTEM_FASHION_MNIST_DIR} (Debian package dataset-fashion-mnist)" in message
  assert f"tensorflow-datasets 'fashion_mnist' in {tmp_path} (download=False)" in message
  for remedy in ("make data", "--data_dir", "train-images-idx3-ubyte.gz", "downloads it"):
    assert remedy in message
  assert listing(tmp_path) == before


# ------------------------------------------------------------------------------ tfds


@pytest.fixture
def network(monkeypatch):
  """Replaces the network probe: set `.reachable`; `.calls` records the hosts probed."""

  class Probe:
    reachable = True
    calls = []

    def __call__(self, hosts, timeout=sources.PROBE_TIMEOUT):
      self.calls.append(tuple(hosts))
      return (True, "") if self.reachable else (False, "mocked: no route to any host")

  probe = Probe()
  monkeypatch.setattr(sources, "network_reachable", probe)
  return probe


def test_tfds_source_under_mock_data(tmp_path, no_system_copy, network, monkeypatch):
  # tfds.testing.mock_data works with tfds.data_source when a split is named (without a
  # split it returns {} because the mocked builder knows no splits), and the mocked
  # source's __getitems__ is broken (unbound), so the loader indexes example by example.
  # The network probe says "reachable": the download path is taken as before.
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with tfds.testing.mock_data(num_examples=12):
    fm = data.load("fashion_mnist")
    cifar = data.load("cifar10")
  assert fm.source == f"tfds:fashion_mnist ({tmp_path})"
  assert fm.x_train.shape == (12, 28, 28, 1) and fm.x_test.shape == (12, 28, 28, 1)
  assert cifar.source == f"tfds:cifar10 ({tmp_path})"
  assert cifar.x_train.shape == (12, 32, 32, 3) and cifar.y_test.shape == (12,)
  for ds in (fm, cifar):
    assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert ds.y_train.dtype == np.int32 and 0 <= ds.y_train.min() and ds.y_train.max() < 10


def test_tfds_copy_prepared_inside_data_dir_is_used(tmp_path, no_system_copy, network):
  # A data_dir may hold tfds' own prepared copy; it is read without any download.
  tfds = pytest.importorskip("tensorflow_datasets")
  (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
  (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
  network.reachable = False
  with tfds.testing.mock_data(num_examples=5):
    ds = data.load("cifar10", data_dir=tmp_path)
  assert ds.source == f"tfds:cifar10 ({tmp_path})" and ds.x_train.shape == (5, 32, 32, 3)
  assert network.calls == []


def test_data_dir_is_not_a_download_folder(tmp_path, network, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: pytest.fail("tfds was asked"))
  with pytest.raises(DataNotFoundError) as info:
    data.load("cifar10", data_dir=tmp_path, download=True)
  assert f"data_dir {tmp_path}: holds neither cifar-10-batches-py/" in str(info.value)
  assert "TFDS_DATA_DIR" in str(info.value) and network.calls == []


@pytest.mark.parametrize("prepared", ["absent", "empty folder"])
def test_offline_download_fails_fast_listing_places(tmp_path, network, monkeypatch, prepared):
  # Offline, tfds would retry DNS lookups for minutes; the probe stops it before tfds.
  network.reachable = False
  tfds = pytest.importorskip("tensorflow_datasets")

  def no_tfds(*args, **kwargs):
    raise AssertionError("tensorflow-datasets was asked to download while offline")

  monkeypatch.setattr(tfds, "data_source", no_tfds)
  if prepared == "empty folder":  # what an interrupted download leaves behind
    (tmp_path / "cifar10").mkdir()
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(DataNotFoundError) as info:
    data.load("cifar10", download=True)
  message = str(info.value)
  assert f"tensorflow-datasets 'cifar10' in {tmp_path} (download=True)" in message
  assert "network is unreachable" in message and "mocked: no route" in message
  assert "cifar-10-python.tar.gz" in message
  assert network.calls == [sources.DOWNLOAD_HOSTS["cifar10"]]


def test_probe_only_before_a_download(tmp_path, network, monkeypatch):
  # download=False never probes; prepared data (dataset_info.json present) is not re-probed.
  with pytest.raises(DataNotFoundError):
    data.load("cifar10", data_dir=tmp_path, download=False)
  assert network.calls == []
  network.reachable = False
  (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
  (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
  assert sources.is_prepared(tmp_path / "cifar10")
  tfds = pytest.importorskip("tensorflow_datasets")

  def reached_tfds(*args, **kwargs):
    raise RuntimeError("reached tfds.data_source")

  monkeypatch.setattr(tfds, "data_source", reached_tfds)
  with pytest.raises(sources.TfdsUnavailableError, match="reached tfds.data_source"):
    sources.load_tfds(
      "cifar10", image_shape=(32, 32, 3), num_classes=10, data_dir=tmp_path, download=True
    )
  assert network.calls == []


@pytest.fixture
def listener():
  """A local TCP server socket: (host, port) that accepts connections, no network needed."""

  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server.getsockname()


def test_network_probe_connects_to_a_listening_host(listener, monkeypatch):
  for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(name, raising=False)
  assert sources.network_reachable((listener,), timeout=2.0) == (True, "")
  # One reachable host among unreachable ones is enough.
  closed = ("127.0.0.1", 1)
  assert sources.network_reachable((closed, listener), timeout=2.0)[0]
  ok, reason = sources.network_reachable((closed,), timeout=2.0)
  assert not ok and "127.0.0.1:1: no connection" in reason


def test_network_probe_goes_through_the_proxy(listener, monkeypatch):
  host, port = listener
  monkeypatch.setenv("https_proxy", f"http://{host}:{port}")
  monkeypatch.setenv("HTTPS_PROXY", f"http://{host}:{port}")
  monkeypatch.delenv("no_proxy", raising=False)
  monkeypatch.delenv("NO_PROXY", raising=False)

  def no_dns(host, *args, **kwargs):
    if host != "127.0.0.1":
      raise socket.gaierror(-2, "Name or service not known")
    return real_getaddrinfo(host, *args, **kwargs)

  real_getaddrinfo = socket.getaddrinfo
  monkeypatch.setattr(socket, "getaddrinfo", no_dns)
  assert sources.network_reachable((("data.example", 443),), timeout=2.0) == (True, "")


def test_network_probe_gives_up_on_a_hanging_dns_lookup(monkeypatch):

  release = threading.Event()
  monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: release.wait(30) and [])
  for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(name, raising=False)
  start = time.monotonic()
  ok, reason = sources.network_reachable((("a.example", 443), ("b.example", 80)), timeout=0.2)
  elapsed = time.monotonic() - start
  release.set()
  assert not ok and elapsed < 5
  assert "a.example: DNS lookup gave no answer within 0.2 s" in reason and "b.example" in reason


def test_network_probe_reports_failed_lookups(monkeypatch):

  def fail(*args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")

  monkeypatch.setattr(socket, "getaddrinfo", fail)
  for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(name, raising=False)
  ok, reason = sources.network_reachable((("a.example", 443),), timeout=1.0)
  assert not ok and "a.example: DNS lookup failed" in reason and "not known" in reason


def test_tfds_is_imported_only_inside_functions():
  # `import jaxshape` stays fast: tensorflow-datasets is imported when first used.
  for path in Path(data.__file__).parent.glob("*.py"):
    tree = ast.parse(path.read_text())
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in top_level for a in n.names] + [
      n.module for n in top_level if isinstance(n, ast.ImportFrom)
    ]
    assert not any(name and name.startswith("tensorflow") for name in names), path


# --------------------------------------------------------------------------- CIFAR-10


def cifar_images(n, offset):
  """[n, 32, 32, 3] uint8 images whose pixels encode (image, row, column, channel)."""
  i, h, w, c = np.meshgrid(np.arange(n), np.arange(32), np.arange(32), np.arange(3), indexing="ij")
  return ((offset + i) * 7 + h * 5 + w * 3 + c * 101).astype(np.uint8)


def write_cifar_batch(path: Path, images_NHWC, labels, overrides=None, protocol=2):
  """A batch as the python release stores it: channel-first rows of 3072 bytes."""
  batch = {
    b"batch_label": b"a batch",
    b"labels": [int(v) for v in labels],
    b"data": images_NHWC.transpose(0, 3, 1, 2).reshape(len(images_NHWC), 3072),
    b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
  }
  batch.update(overrides or {})
  path.write_bytes(pickle.dumps(batch, protocol=protocol))


def write_cifar(parent: Path, n=3, protocol=2) -> Path:
  folder = parent / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
    write_cifar_batch(
      folder / name, cifar_images(n, n * b), (np.arange(n) + b) % 10, protocol=protocol
    )
  return folder


@pytest.mark.parametrize("point_at, protocol", [("parent", 2), ("folder", pickle.HIGHEST_PROTOCOL)])
def test_cifar10_from_pickles(tmp_path, point_at, protocol):
  folder = write_cifar(tmp_path, protocol=protocol)
  ds = data.load("cifar10", data_dir=tmp_path if point_at == "parent" else folder)
  assert ds.source == str(folder) and ds.num_classes == 10 and ds.class_names[0] == "airplane"
  assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(ds.x_train, cifar_images(15, 0) / np.float32(255))
  np.testing.assert_array_equal(ds.x_test, cifar_images(3, 15) / np.float32(255))
  np.testing.assert_array_equal(ds.y_train, [(i % 3 + i // 3) % 10 for i in range(15)])
  assert ds.x_train.flags.c_contiguous and ds.x_test.flags.c_contiguous


def test_cifar10_not_found(tmp_path):
  with pytest.raises(DataNotFoundError, match="cifar-10-batches-py") as info:
    data.load("cifar10", data_dir=tmp_path, download=False)
  assert "cifar-10-python.tar.gz" in str(info.value) and "tensorflow-datasets" in str(info.value)


class _Evil:
  def __reduce__(self):
    return (print, ("this must never run",))


# -------------------------------------------------------------------------- Purchase-100


def purchase_records(n, num_features=16):
  """Binary records whose features spell the record's index; class = index % 100."""
  index = np.arange(n)
  x = ((index[:, None] >> np.arange(num_features)) & 1).astype(np.float32)
  return x, index % 100


def decode_records(x):
  return (x.astype(np.int64) << np.arange(x.shape[1])).sum(axis=1)


def write_purchase_csv(path: Path, n=20_050, *, first_lines=()) -> Path:
  x, y = purchase_records(n)
  lines = [",".join([str(c + 1)] + [str(int(v)) for v in row]) for row, c in zip(x, y, strict=True)]
  path.write_text("\n".join(list(first_lines) + lines) + "\n")
  return path


def test_purchase100_npz(tmp_path):
  x, y = purchase_records(300)
  np.savez(tmp_path / "purchase100.npz", x[:200], y[:200], x[200:], y[200:])
  ds = data.load("purchase100", data_dir=tmp_path)
  assert ds.num_classes == 100 and ds.source == str(tmp_path / "purchase100.npz")
  assert ds.x_train.shape == (200, 16) and ds.x_test.shape == (100, 16)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(ds.x_train, x[:200])
  np.testing.assert_array_equal(ds.y_test, y[200:])


def test_purchase100_npz_with_one_hot_labels(tmp_path):
  x, y = purchase_records(50)
  path = tmp_path / "mine.npz"
  np.savez(path, x[:30], np.eye(100)[y[:30]], x[30:], np.eye(100)[y[30:]])
  np.testing.assert_array_equal(data.load("purchase100", data_dir=path).y_train, y[:30])


def test_purchase100_csv_random_split(tmp_path):
  write_purchase_csv(tmp_path / "dataset_purchase")
  ds = data.load("purchase100", data_dir=tmp_path, seed=0)
  assert ds.x_train.shape == (10_000, 16) and ds.x_test.shape == (10_000, 16)
  train_rows, test_rows = decode_records(ds.x_train), decode_records(ds.x_test)
  assert len(set(train_rows) | set(test_rows)) == 20_000  # disjoint, no duplicates
  np.testing.assert_array_equal(ds.y_train, train_rows % 100)  # labels 1..100 -> 0..99
  np.testing.assert_array_equal(ds.y_test, test_rows % 100)
  again = data.load("purchase100", data_dir=tmp_path, seed=0)
  other = data.load("purchase100", data_dir=tmp_path, seed=1)
  np.testing.assert_array_equal(again.x_train, ds.x_train)
  assert not np.array_equal(other.x_train, ds.x_train)


@pytest.mark.parametrize("data_dir", [None, "empty"])
def test_purchase100_missing_says_where_to_get_it(tmp_path, data_dir):
  with pytest.raises(DataNotFoundError) as info:
    data.load("purchase100", data_dir=None if data_dir is None else tmp_path)
  for hint in ("Shokri", "dataset_purchase", "arr_0..arr_3", "--data_dir"):
    assert hint in str(info.value)


# ------------------------------------------------------------------------- bad inputs


def _fm_folder(tmp_path, y_train=None, y_test=None, gz=True):
  y_train = tiny_labels(30) if y_train is None else y_train
  y_test = tiny_labels(20, seed=1) if y_test is None else y_test
  return write_fashion_mnist(tmp_path / "fm", y_train, y_test, gz=gz)


def _fm_truncated_gz(tmp_path):
  path = _fm_folder(tmp_path) / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-40])
  return path.parent, "train-images-idx3-ubyte.gz: truncated or corrupt gzip"


def _fm_wrong_magic(tmp_path):
  folder = _fm_folder(tmp_path, gz=False)
  (folder / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0803, 0))
  return folder, "t10k-labels-idx1-ubyte: wrong IDX magic number 0x00000803"


def _fm_header_vs_data(tmp_path):
  folder = _fm_folder(tmp_path, gz=False)
  path = folder / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-784])
  return folder, "t10k-images-idx3-ubyte: the header gives shape \\(20, 28, 28\\)"


def _fm_images_vs_labels(tmp_path):
  folder = _fm_folder(tmp_path)
  write_idx(folder / "train-labels-idx1-ubyte.gz", tiny_labels(29))
  return folder, "holds 30 images but .*train-labels-idx1-ubyte.gz holds 29 labels"


def _fm_label_out_of_range(tmp_path):
  return _fm_folder(tmp_path, y_test=np.arange(20) % 11), "label out of range: 10"


def _fm_wrong_image_size(tmp_path):
  folder = _fm_folder(tmp_path, gz=False)
  write_idx(folder / "train-images-idx3-ubyte", np.zeros((30, 32, 32), np.uint8))
  return folder, "images are \\(32, 32\\), expected 28x28"


def _cifar_bad(tmp_path, name="data_batch_2", overrides=None):
  folder = write_cifar(tmp_path)
  write_cifar_batch(folder / name, cifar_images(3, 0), [1, 2, 3], overrides)
  return tmp_path


def _cifar_label_out_of_range(tmp_path):
  return _cifar_bad(tmp_path, overrides={b"labels": [0, 10, 2]}), "data_batch_2: label out of range"


def _cifar_wrong_data_shape(tmp_path):
  data_ = np.zeros((3, 3000), np.uint8)
  return _cifar_bad(tmp_path, overrides={b"data": data_}), "expected uint8 \\[N, 3072\\]"


def _cifar_count_mismatch(tmp_path):
  return _cifar_bad(tmp_path, "test_batch", {b"labels": [1, 2]}), "3 images but 2 labels"


def _cifar_not_a_pickle(tmp_path):
  folder = write_cifar(tmp_path)
  (folder / "data_batch_5").write_bytes(b"\x80\x02}q\x00(U\x04data")  # truncated pickle
  return folder, "data_batch_5: not a CIFAR-10 batch pickle"


def _cifar_pickle_with_code(tmp_path):
  folder = write_cifar(tmp_path)
  (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
  return folder, "refusing to load (__builtin__|builtins).print"


def _purchase_npz(tmp_path, **changes):
  x, y = purchase_records(40)
  arrays = {"arr_0": x[:30], "arr_1": y[:30], "arr_2": x[30:], "arr_3": y[30:]}
  arrays.update(changes)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(tmp_path / "purchase100.npz", **arrays)
  return tmp_path


def _purchase_nan(tmp_path):
  x = purchase_records(10)[0]
  x[3, 2] = np.nan
  return _purchase_npz(tmp_path, arr_2=x), "purchase100.npz: 1 features are NaN"


def _purchase_feature_range(tmp_path):
  x = purchase_records(30)[0] * 2
  return _purchase_npz(tmp_path, arr_0=x), "features span \\[0, 2\\], expected \\[0, 1\\]"


def _purchase_npz_label_range(tmp_path):
  return _purchase_npz(tmp_path, arr_3=np.arange(10) + 95), "label out of range"


def _purchase_npz_missing_array(tmp_path):
  return _purchase_npz(tmp_path, arr_3=None), "lacks arr_3"


def _purchase_npz_truncated(tmp_path):
  path = _purchase_npz(tmp_path) / "purchase100.npz"
  path.write_bytes(path.read_bytes()[:-300])  # zipfile.is_zipfile says False: still an .npz
  return path, "purchase100.npz: not a readable .npz file"


def _purchase_npz_truncated_other_name(tmp_path):
  contents = (_purchase_npz(tmp_path) / "purchase100.npz").read_bytes()
  (tmp_path / "purchase100.npz").unlink()
  path = tmp_path / "dataset_purchase"  # a CSV name, but zip bytes: read as an .npz
  path.write_bytes(contents[: len(contents) // 2])
  return path, "dataset_purchase: not a readable .npz file"


def _purchase_npz_bad_crc(tmp_path):
  path = _purchase_npz(tmp_path) / "purchase100.npz"
  contents = bytearray(path.read_bytes())
  contents[200] ^= 0xFF  # inside arr_0's data: only the CRC-32 notices
  path.write_bytes(bytes(contents))
  return path, "purchase100.npz: not a readable .npz file \\(BadZipFile: Bad CRC-32"


def _purchase_csv_label_range(tmp_path):
  path = write_purchase_csv(
    tmp_path / "dataset_purchase", 50, first_lines=["101," + "0," * 15 + "1"]
  )
  return path, "label out of range: the first column spans \\[1, 101\\]"


def _purchase_csv_label_zero(tmp_path):
  path = write_purchase_csv(tmp_path / "dataset_purchase", 50, first_lines=["0," + "0," * 15 + "1"])
  return path, "expected classes 1..100"


def _purchase_csv_nan(tmp_path):
  path = write_purchase_csv(tmp_path / "dataset_purchase", 50, first_lines=["5,nan" + ",0" * 15])
  return path, "NaN"


def _purchase_csv_ragged(tmp_path):
  path = write_purchase_csv(tmp_path / "dataset_purchase", 50, first_lines=["5,1,0"])
  return path, "not a comma-separated table"


def _purchase_csv_too_small(tmp_path):
  return write_purchase_csv(tmp_path / "dataset_purchase", 500), "holds 500 records"


@pytest.mark.parametrize(
  "name, make_bad_input",
  [
    ("fashion_mnist", _fm_truncated_gz),
    ("fashion_mnist", _fm_wrong_magic),
    ("fashion_mnist", _fm_header_vs_data),
    ("fashion_mnist_3_4", _fm_images_vs_labels),
    ("fashion_mnist", _fm_label_out_of_range),
    ("fashion_mnist", _fm_wrong_image_size),
    ("cifar10", _cifar_label_out_of_range),
    ("cifar10", _cifar_wrong_data_shape),
    ("cifar10", _cifar_count_mismatch),
    ("cifar10", _cifar_not_a_pickle),
    ("cifar10", _cifar_pickle_with_code),
    ("purchase100", _purchase_nan),
    ("purchase100", _purchase_feature_range),
    ("purchase100", _purchase_npz_label_range),
    ("purchase100", _purchase_npz_missing_array),
    ("purchase100", _purchase_npz_truncated),
    ("purchase100", _purchase_npz_truncated_other_name),
    ("purchase100", _purchase_npz_bad_crc),
    ("purchase100", _purchase_csv_label_range),
    ("purchase100", _purchase_csv_label_zero),
    ("purchase100", _purchase_csv_nan),
    ("purchase100", _purchase_csv_ragged),
    ("purchase100", _purchase_csv_too_small),
  ],
)
def test_bad_input_raises_value_error_naming_file(tmp_path, capsys, name, make_bad_input):
  data_dir, message = make_bad_input(tmp_path)
  before = listing(tmp_path)
  with pytest.raises(DataFormatError, match=message) as info:
    data.load(name, data_dir=data_dir, download=False)
  assert isinstance(info.value, ValueError)
  assert Path(info.value.path).is_file() and info.value.path in str(info.value)
  assert listing(tmp_path) == before  # nothing written
  assert "must never run" not in capsys.readouterr().out


def _cifar_batch_is_a_folder(tmp_path):
  folder = write_cifar(tmp_path)
  (folder / "data_batch_3").unlink()
  (folder / "data_batch_3").mkdir()
  return folder / "data_batch_3", "a CIFAR-10 batch file"


def _purchase_name_is_a_folder(tmp_path):
  (tmp_path / "purchase100.npz").mkdir()
  return tmp_path / "purchase100.npz", "a Purchase-100 file"


@pytest.mark.parametrize(
  "name, make_bad_input",
  [("cifar10", _cifar_batch_is_a_folder), ("purchase100", _purchase_name_is_a_folder)],
)
def test_folder_where_a_data_file_should_be(tmp_path, name, make_bad_input):
  path, expected = make_bad_input(tmp_path)
  with pytest.raises(DataFormatError, match=f"is a folder, expected {expected}") as info:
    data.load(name, data_dir=tmp_path, download=False)
  assert info.value.path == str(path)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"name": "mnist"}, "unknown data set 'mnist'; known: fashion_mnist, fashion_mnist_3_4"),
    ({"name": "two_moons", "seed": -1}, "seed must be an integer >= 0"),
    ({"name": "two_moons", "seed": 1.5}, "seed must be an integer >= 0"),
    ({"name": "two_moons", "seed": True}, "seed must be an integer >= 0"),
    ({"name": "two_moons", "data_dir": "mine"}, "given for two_moons, which is generated"),
    ({"name": "cifar10", "download": "no"}, "download must be True or False"),
    ({"name": "cifar10", "data_dir": 3}, "data_dir must be a path"),
  ],
)
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.load(**kwargs)


# ----------------------------------------------------------------------------- Dataset


def test_dataset_keeps_callers_arrays_writable():
  x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int32)
  ds = data.Dataset("mine", x, y, x[:2], y[:2], num_classes=3)
  x[0, 0] = 1.0  # the caller's array is untouched ...
  assert ds.x_train[0, 0] == 1.0 and not ds.x_train.flags.writeable  # ... the field is a view


@pytest.mark.parametrize(
  "change, message",
  [
    ({"y_train": np.zeros(3, np.int32)}, "x_train has 4 examples but y_train has 3"),
    ({"x_test": np.zeros((2, 3), np.float32)}, "x_test has inputs of shape \\(3,\\)"),
    ({"x_train": np.zeros((4, 2))}, "x_train must be a float32 numpy array"),
    ({"y_test": np.zeros(2, np.int64)}, "y_test must be a 1-D int32"),
    ({"y_train": np.full(4, 3, np.int32)}, "y_train has labels outside \\[0, 3\\)"),
    ({"x_holdout": np.zeros((1, 2), np.float32)}, "both be given or both be None"),
    ({"class_names": ("a", "b")}, "class_names has 2 names for 3 classes"),
  ],
)
def test_dataset_rejects_inconsistent_fields(change, message):
  fields = dict(
    name="mine",
    x_train=np.zeros((4, 2), np.float32),
    y_train=np.zeros(4, np.int32),
    x_test=np.zeros((2, 2), np.float32),
    y_test=np.zeros(2, np.int32),
    num_classes=3,
  )
  with pytest.raises(ValueError, match=message):
    data.Dataset(**{**fields, **change})


# --------------------------------------------------------------------------- two moons


def test_two_moons_load():
  ds = data.load("two_moons", seed=3)
  assert ds.x_train.shape == (700, 2) and ds.x_test.shape == (300, 2) and ds.num_classes == 2
  assert ds.source == "generated" and ds.x_holdout is None
  np.testing.assert_array_equal(ds.x_train, data.load("two_moons", seed=3).x_train)
  assert not np.array_equal(ds.x_train, data.load("two_moons", seed=4).x_train)
  assert set(np.unique(ds.y_train)) == {0, 1}


def test_make_two_moons_geometry():
  x, y = make_two_moons(101, noise=0.0, seed=0)
  assert x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y), [51, 50])
  np.testing.assert_allclose(np.hypot(*x[y == 0].T), 1.0, atol=1e-6)  # upper moon
  np.testing.assert_allclose(np.hypot(x[y == 1, 0] - 1, x[y == 1, 1] - 0.5), 1.0, atol=1e-6)
  assert np.all(x[y == 0, 1] >= 0) and np.all(x[y == 1, 1] <= 0.5)
  noisy, _ = make_two_moons(101, noise=0.1, seed=0)
  assert 0.05 < np.std(noisy - x) < 0.15  # same order, then noise of sd 0.1


@pytest.mark.parametrize(
  "kwargs, message",
  [({"n": 1}, "n must be an integer >= 2"), ({"n": 10, "noise": -0.1}, "noise must be")],
)
def test_make_two_moons_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_two_moons(**kwargs)


# ---------------------------------------------------------------- the real FashionMNIST


@pytest.mark.skipif(
  not (sources.SYSTEM_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
  reason=f"Debian's FashionMNIST (dataset-fashion-mnist) is not in {sources.SYSTEM_FASHION_MNIST_DIR}",
)
def test_real_fashion_mnist_counts():
  arrays = fashion_mnist.read_idx_files(
    fashion_mnist.find_idx_files(sources.SYSTEM_FASHION_MNIST_DIR)[0]
  )
  x_train, y_train, x_test, y_test = arrays
  assert x_train.shape == (60_000, 28, 28, 1) and x_test.shape == (10_000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(y_train), [6_000] * 10)
  ds = data.load("fashion_mnist_3_4")
  assert ds.source == str(sources.SYSTEM_FASHION_MNIST_DIR)
  assert (len(ds.y_train), len(ds.y_holdout), len(ds.y_test)) == (10_800, 1_200, 2_000)
  np.testing.assert_array_equal(np.bincount(ds.y_train), [5_400, 5_400])
  np.testing.assert_array_equal(np.bincount(ds.y_holdout), [600, 600])
  np.testing.assert_array_equal(np.bincount(ds.y_test), [1_000, 1_000])
