"""Reading and validating IDX files (the MNIST / FashionMNIST format), raw or gzipped.

An IDX file is a 4-byte magic number (two zero bytes, a type code, 0x08 for
unsigned bytes, and the number of dimensions), one big-endian uint32 per
dimension, then the data in row-major order. Known files of the FashionMNIST
release are checked against their checksums; other files (e.g. tests' tiny
ones) only against the header.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from jaxshape.data.dataset import DataFormatError

__all__ = [
  "RELEASE_MD5",
  "read_idx",
  "verify_release_checksum",
]

_UBYTE = 0x08

# MD5 of the files of the FashionMNIST release, keyed by file name and size in
# bytes:
# - Zalando's .gz files: MD5 as published in the release's README, sizes as in
#   tensorflow-datasets' url checksums;
# - Debian's dataset-fashion-mnist: the same gzip members with the file name and
#   time stamp removed from the header (hence 23-24 bytes smaller). Putting the
#   name and the original time stamp (2017-08-31) back reproduces Zalando's
#   files byte for byte (their tfds SHA-256 and the MD5s below);
# - the unpacked files, identical whichever of the two .gz they come from.
RELEASE_MD5: dict[str, dict[int, str]] = {
  "train-images-idx3-ubyte.gz": {
    26421880: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    26421856: "cf8536b0aa1a6ac5fa3f23001093305c",
  },
  "train-labels-idx1-ubyte.gz": {
    29515: "25c81989df183df01b3e8a0aad5dffbe",
    29491: "10bea18fdb374794d4bb42e356e600c9",
  },
  "t10k-images-idx3-ubyte.gz": {
    4422102: "bef4ecab320f06d8554ea6380940ec79",
    4422079: "f78720b4224f21cce2f2ccf2d7a94c9a",
  },
  "t10k-labels-idx1-ubyte.gz": {
    5148: "bb300cfdad3c16e7a12a480ee83cd310",
    5125: "0d30e22e447f3c33dab9ed536400ac01",
  },
  "train-images-idx3-ubyte": {47040016: "f4a8712d7a061bf5bd6d2ca38dc4d50a"},
  "train-labels-idx1-ubyte": {60008: "9018921c3c673c538a1fc5bad174d6f9"},
  "t10k-images-idx3-ubyte": {7840016: "8181f5470baa50b63fa0f6fddb340f0a"},
  "t10k-labels-idx1-ubyte": {10008: "15d484375f8d13e6eb1aabb0c3f46965"},
}


def verify_release_checksum(path: Path, contents: bytes) -> None:
  """Checks a file of the FashionMNIST release against its known MD5.

  Only files whose name and size match a release file are checked, so other
  IDX files with the release's names still load.

  Args:
    path: the file, for its name and the error message.
    contents: its bytes, as stored on disk.

  Raises:
    DataFormatError: the file has a release file's name and size but not its
      checksum.
  """
  expected = RELEASE_MD5.get(path.name, {}).get(len(contents))
  if expected is None:
    return
  actual = hashlib.md5(contents, usedforsecurity=False).hexdigest()
  if actual != expected:
    raise DataFormatError(
      path,
      f"MD5 checksum {actual} does not match the FashionMNIST release's {expected} "
      f"for a {len(contents)}-byte {path.name}: the file is corrupt or modified; "
      "download it again",
    )


def read_idx(path: str | os.PathLike[str], *, ndim: int) -> np.ndarray:
  """Reads an unsigned-byte IDX file (gzipped if its name ends in .gz).

  Args:
    path: the file.
    ndim: the number of dimensions it must have (1 for labels, 3 for images).

  Returns:
    A read-only uint8 array of the shape the header states.

  Raises:
    DataFormatError: a truncated or corrupt .gz, a wrong magic number, or a
      header that disagrees with the amount of data.

  Example:
    >>> labels_N = read_idx("train-labels-idx1-ubyte.gz", ndim=1)  # doctest: +SKIP
  """
  path = Path(path)
  contents = path.read_bytes()
  verify_release_checksum(path, contents)
  if path.suffix == ".gz":
    contents = _gunzip(path, contents)
  return _parse_idx(path, contents, ndim)


def _gunzip(path: Path, contents: bytes) -> bytes:
  """Decompresses (possibly concatenated) gzip members, checking each one's CRC and length."""
  if contents[:2] != b"\x1f\x8b":
    raise DataFormatError(path, "not a gzip file (no gzip magic bytes); is it unpacked?")
  members = []
  rest = contents
  try:
    while rest:
      member = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
      members.append(member.decompress(rest))
      if not member.eof:
        raise DataFormatError(path, "truncated or corrupt gzip data (the stream ends early)")
      rest = member.unused_data
      if not rest.strip(b"\0"):  # gzip tolerates trailing zero padding
        break
  except zlib.error as e:
    raise DataFormatError(path, f"truncated or corrupt gzip data ({e})") from e
  return members[0] if len(members) == 1 else b"".join(members)


def _parse_idx(path: Path, contents: bytes, ndim: int) -> np.ndarray:
  expected_magic = (_UBYTE << 8) | ndim
  if len(contents) < 4:
    raise DataFormatError(path, f"{len(contents)} bytes is too short for an IDX header")
  (magic,) = struct.unpack(">I", contents[:4])
  if magic != expected_magic:
    raise DataFormatError(
      path,
      f"wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
      f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})",
    )
  header_size = 4 + 4 * ndim
  if len(contents) < header_size:
    raise DataFormatError(path, "truncated IDX header")
  dims = struct.unpack(f">{ndim}I", contents[4:header_size])
  data_size = len(contents) - header_size
  if data_size != math.prod(dims):
    raise DataFormatError(
      path,
      f"the header gives shape {dims} ({math.prod(dims)} bytes of data) but the file "
      f"holds {data_size} bytes after the header: truncated or corrupt",
    )
  return np.frombuffer(contents, np.uint8, offset=header_size).reshape(dims)
