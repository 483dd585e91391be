"""Fuzzes the file readers of jaxshape/data and jaxshape/poisons with hypothesis.

Valid IDX (FashionMNIST), CIFAR-10 batch pickles, Purchase-100 `.npz` and CSV
files and PoisonSet `.npz` files are mutated (truncated, bytes flipped,
inserted or deleted); each mutant must either load or raise the documented
error, `DataFormatError` naming the file, and never anything else, nor hang
(an alarm stops a call after `HANG_SECONDS`). Bounded: few examples per
format, derandomized (the same mutants in every run), no example database;
JAXSHAPE_FUZZ_EXAMPLES raises the count for a longer hunt.
"""

import contextlib
import gzip
import os
import pickle
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from jaxshape import data
from jaxshape import poisons
from jaxshape.data import DataFormatError
from jaxshape.data import purchase100

HANG_SECONDS = 10
FUZZ = settings(
  # More mutants for a longer hunt: JAXSHAPE_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz_files.py
  max_examples=int(os.environ.get("JAXSHAPE_FUZZ_EXAMPLES", "25")),
  deadline=None,  # a hang is caught by the alarm; slow CI machines vary
  derandomize=True,
  database=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------ mutations


@st.composite
def mutations(draw, size: int):
  """A list of (kind, position, byte) edits to a file of `size` bytes."""
  kinds = st.sampled_from(["truncate", "flip", "set", "insert", "delete"])
  edits = draw(
    st.lists(
      st.tuples(kinds, st.integers(0, max(0, size - 1)), st.integers(0, 255)),
      min_size=1,
      max_size=4,
    )
  )
  return edits


def mutate(contents: bytes, edits) -> bytes:
  out = bytearray(contents)
  for kind, position, value in edits:
    position = min(position, len(out))
    if kind == "truncate":
      del out[position:]
    elif kind == "flip" and position < len(out):
      out[position] ^= 1 << (value % 8)
    elif kind == "set" and position < len(out):
      out[position] = value
    elif kind == "insert":
      out[position:position] = bytes([value]) * (1 + value % 7)
    elif kind == "delete":
      del out[position : position + 1 + value % 16]
  return bytes(out)


@contextlib.contextmanager
def no_hang(what: str):
  def on_alarm(signum, frame):
    raise TimeoutError(f"{what} did not return within {HANG_SECONDS} s")

  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(HANG_SECONDS)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def loads_or_documented_error(call, path: Path):
  """Runs `call()`; passes if it returns or raises DataFormatError naming `path`."""
  with no_hang(str(path)):
    try:
      call()
    except DataFormatError as e:
      assert str(path) in str(e) or Path(e.path).parent == path.parent, str(e)


# ------------------------------------------------------------------------- originals


def _idx(array: np.ndarray) -> bytes:
  header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def _fashion_mnist_files() -> dict[str, bytes]:
  rng = np.random.default_rng(0)
  files = {}
  for stem, n in (("train", 12), ("t10k", 6)):
    labels = np.arange(n) % 10
    images = rng.integers(0, 256, (n, 28, 28))
    files[f"{stem}-images-idx3-ubyte.gz"] = gzip.compress(_idx(images), mtime=0)
    files[f"{stem}-labels-idx1-ubyte"] = _idx(labels)
  return files


def _cifar_batch(n: int, seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  batch = {
    b"labels": [int(v) for v in rng.integers(0, 10, n)],
    b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
    b"batch_label": b"fuzz",
  }
  return pickle.dumps(batch, protocol=2)


def _npz_bytes(**arrays) -> bytes:
  with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "a.npz"
    np.savez(path, **arrays)
    return path.read_bytes()


def _purchase_npz() -> bytes:
  rng = np.random.default_rng(1)
  x = rng.integers(0, 2, (30, 12)).astype(np.float32)
  y = rng.integers(0, 100, 30)
  return _npz_bytes(arr_0=x[:20], arr_1=y[:20], arr_2=x[20:], arr_3=y[20:])


def _purchase_csv() -> bytes:
  rng = np.random.default_rng(2)
  lines = [",".join(map(str, [c] + list(rng.integers(0, 2, 12)))) for c in range(1, 21)]
  return ("\n".join(lines) + "\n").encode()


def _poison_set() -> bytes:
  import jax.numpy as jnp

  ps = poisons.PoisonSet(
    x=jnp.linspace(0.0, 1.0, 3 * 16).reshape(3, 4, 4, 1),
    y=jnp.array([0, 1, 0], jnp.int32),
    attack="patch",
    base_idx=jnp.array([2, 5, 7], jnp.int32),
    target_idx=jnp.full([3], -1, jnp.int32),
    target_class=1,
    base_split="train",
    trigger=poisons.patch_trigger((4, 4, 1), 2),
    config={"ratio": 0.1},
    info={"score_P": jnp.arange(3.0)},
  )
  with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "p.npz"
    poisons.save(path, ps)
    return path.read_bytes()


FASHION_MNIST = _fashion_mnist_files()
CIFAR = {
  name: _cifar_batch(3, i) for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)])
}
CIFAR["test_batch"] = _cifar_batch(2, 9)
PURCHASE_NPZ = _purchase_npz()
PURCHASE_CSV = _purchase_csv()
POISON_SET = _poison_set()


# ---------------------------------------------------------------------------- tests


def test_originals_load():
  """The unmutated files load: the fuzz tests start from valid files."""
  with tempfile.TemporaryDirectory() as folder:
    folder = Path(folder)
    for name, contents in {**FASHION_MNIST, **CIFAR}.items():
      (folder / name).write_bytes(contents)
    assert data.load("fashion_mnist", data_dir=folder).x_train.shape == (12, 28, 28, 1)
    assert data.load("cifar10", data_dir=folder).x_train.shape == (15, 32, 32, 3)
    (folder / "purchase100.npz").write_bytes(PURCHASE_NPZ)
    assert data.load("purchase100", data_dir=folder).x_train.shape == (20, 12)
    (folder / "dataset_purchase").write_bytes(PURCHASE_CSV)
    x_train = purchase100.read_csv(folder / "dataset_purchase", seed=0, num_train=5, num_test=5)[0]
    assert x_train.shape == (5, 12)
    (folder / "p.npz").write_bytes(POISON_SET)
    assert len(poisons.load(folder / "p.npz")) == 3


@FUZZ
@given(
  name=st.sampled_from(sorted(FASHION_MNIST)),
  edits=mutations(max(len(v) for v in FASHION_MNIST.values())),
)
def test_fuzzed_idx_files(name, edits):
  with tempfile.TemporaryDirectory() as folder:
    folder = Path(folder)
    for other, contents in FASHION_MNIST.items():
      (folder / other).write_bytes(mutate(contents, edits) if other == name else contents)
    loads_or_documented_error(lambda: data.load("fashion_mnist", data_dir=folder), folder / name)


@FUZZ
@given(name=st.sampled_from(sorted(CIFAR)), edits=mutations(len(CIFAR["data_batch_1"])))
def test_fuzzed_cifar10_pickles(name, edits):
  with tempfile.TemporaryDirectory() as folder:
    folder = Path(folder)
    for other, contents in CIFAR.items():
      (folder / other).write_bytes(mutate(contents, edits) if other == name else contents)
    loads_or_documented_error(lambda: data.load("cifar10", data_dir=folder), folder / name)


@FUZZ
@given(edits=mutations(len(PURCHASE_NPZ)))
def test_fuzzed_purchase100_npz(edits):
  with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "purchase100.npz"
    path.write_bytes(mutate(PURCHASE_NPZ, edits))
    loads_or_documented_error(lambda: data.load("purchase100", data_dir=path), path)


@FUZZ
@given(edits=mutations(len(PURCHASE_CSV)))
def test_fuzzed_purchase100_csv(edits):
  with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "dataset_purchase"
    path.write_bytes(mutate(PURCHASE_CSV, edits))
    loads_or_documented_error(
      lambda: (
        purchase100.read_file(path, seed=0)
        if purchase100.npz.is_zip(path)
        else purchase100.read_csv(path, seed=0, num_train=5, num_test=5)
      ),
      path,
    )


@FUZZ
@given(edits=mutations(len(POISON_SET)))
def test_fuzzed_poison_set(edits):
  with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "p.npz"
    path.write_bytes(mutate(POISON_SET, edits))
    loads_or_documented_error(lambda: poisons.load(path), path)


@pytest.mark.parametrize("cut", [0, 1, 10, 100, 1000])
def test_truncated_poison_set_is_a_format_error(tmp_path, cut):
  path = tmp_path / "p.npz"
  path.write_bytes(POISON_SET[:cut])
  with pytest.raises(DataFormatError, match="p.npz"):
    poisons.load(path)
