"""Tests jaxshape/data/idx.py: IDX parsing, gzip handling, validation and release checksums."""

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from jaxshape.data import DataFormatError
from jaxshape.data import idx
from jaxshape.data.sources import SYSTEM_FASHION_MNIST_DIR


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None) -> Path:
  """Writes `array` (uint8) as an IDX file, gzipped when the name ends in .gz."""
  if magic is None:
    magic = 0x0800 | array.ndim
  contents = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  contents += array.astype(np.uint8).tobytes()
  if path.suffix == ".gz":
    contents = gzip.compress(contents, mtime=0)
  path.write_bytes(contents)
  return path


def _images(n):
  return np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(37,), (37, 28, 28), (5, 3, 4)])
def test_round_trip(tmp_path, suffix, shape):
  array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  path = write_idx(tmp_path / f"some-file{suffix}", array)
  out = idx.read_idx(path, ndim=len(shape))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, array)


def test_release_names_with_other_sizes_load(tmp_path):
  # Tiny files under the release's names are not checksummed (their size differs).
  labels = np.arange(40, dtype=np.uint8) % 10
  for name in ("train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz"):
    path = write_idx(tmp_path / name, labels)
    np.testing.assert_array_equal(idx.read_idx(path, ndim=1), labels)


def _truncate_gz(path):
  path.write_bytes(path.read_bytes()[:-30])


def _corrupt_gz(path):
  contents = bytearray(path.read_bytes())
  middle = len(contents) // 2
  contents[middle : middle + 8] = b"\xff" * 8
  path.write_bytes(bytes(contents))


def _bad_crc(path):
  contents = bytearray(path.read_bytes())
  contents[-8] ^= 0xFF  # the CRC-32 of the gzip trailer
  path.write_bytes(bytes(contents))


def _unpacked_under_gz_name(path):
  path.write_bytes(gzip.decompress(path.read_bytes()))


def _cut_header(path):
  path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:10], mtime=0))


def _cut_data(path):
  path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100], mtime=0))


def _extra_data(path):
  path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + b"\0" * 7, mtime=0))


def _wrong_magic(path):
  write_idx(path, _images(20), magic=0x0801)


def _wrong_type(path):
  write_idx(path, _images(20), magic=0x0D03)  # 0x0D: float32 data


def _empty(path):
  path.write_bytes(gzip.compress(b"", mtime=0))


@pytest.mark.parametrize(
  "corrupt, message",
  [
    (_truncate_gz, "truncated or corrupt gzip"),
    (_corrupt_gz, "truncated or corrupt gzip"),
    (_bad_crc, "truncated or corrupt gzip"),
    (_unpacked_under_gz_name, "not a gzip file"),
    (_cut_header, "truncated IDX header"),
    (_cut_data, "holds 15580 bytes after the header"),
    (_extra_data, "holds 15687 bytes after the header"),
    (_wrong_magic, "wrong IDX magic number 0x00000801, expected 0x00000803"),
    (_wrong_type, "wrong IDX magic number 0x00000d03"),
    (_empty, "too short"),
  ],
)
def test_bad_file_raises_naming_file(tmp_path, corrupt, message):
  path = write_idx(tmp_path / "images-idx3-ubyte.gz", _images(20))
  corrupt(path)
  with pytest.raises(DataFormatError, match=message) as info:
    idx.read_idx(path, ndim=3)
  assert str(path) in str(info.value)
  assert info.value.path == str(path)
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
  "name, size",
  [(name, size) for name, sizes in idx.RELEASE_MD5.items() for size in sizes],
)
def test_release_sized_file_with_wrong_contents_raises(tmp_path, name, size):
  path = tmp_path / name
  path.write_bytes(b"\x1f\x8b" + bytes(size - 2))
  with pytest.raises(DataFormatError, match="MD5 checksum"):
    idx.read_idx(path, ndim=1 if "labels" in name else 3)


def test_valid_idx_of_release_size_but_other_labels_raises(tmp_path):
  # A well-formed IDX file with the release's 10,000 labels, but not the release's.
  path = write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(10_000, np.uint8))
  with pytest.raises(DataFormatError, match="does not match the FashionMNIST release"):
    idx.read_idx(path, ndim=1)


@pytest.mark.skipif(
  not (SYSTEM_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
  reason=f"Debian's FashionMNIST is not installed in {SYSTEM_FASHION_MNIST_DIR}",
)
def test_system_files_match_known_checksums():
  for name in ("t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    packed = (SYSTEM_FASHION_MNIST_DIR / name).read_bytes()
    md5 = hashlib.md5(packed).hexdigest()
    assert idx.RELEASE_MD5[name][len(packed)] == md5
    unpacked = gzip.decompress(packed)
    assert idx.RELEASE_MD5[name[:-3]][len(unpacked)] == hashlib.md5(unpacked).hexdigest()
