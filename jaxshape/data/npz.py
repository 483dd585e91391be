"""Reading `.npz` files defensively: every kind of damage becomes one `DataFormatError`.

`np.load` on a damaged `.npz` raises whatever its layers raise (`BadZipFile`,
`zlib.error`, `EOFError`, a `ValueError` from the array header, a
`MemoryError` for a header that claims a huge shape, ...) and names no file.
`read_npz` reads each member itself: it checks the `.npy` header against the
bytes the member holds before allocating anything, refuses object arrays (no
pickles), and lets `zipfile` check every member's CRC-32.

Used by the Purchase-100 loader and by `jaxshape.poisons.load`.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib

import numpy as np

from jaxshape.data.dataset import DataFormatError

__all__ = [
  "is_zip",
  "read_npz",
]

_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"

# What the zip, zlib and .npy layers raise on damaged bytes.
_DAMAGE = (
  OSError,
  EOFError,
  ValueError,
  zipfile.BadZipFile,
  zlib.error,
  struct.error,
  NotImplementedError,  # an unknown compression method
  RuntimeError,  # an "encrypted" member
  KeyError,
  IndexError,
  TypeError,
  OverflowError,
  SyntaxError,  # the .npy header is a Python literal, parsed by `ast`
  RecursionError,
  MemoryError,
)


def is_zip(path: str | os.PathLike[str]) -> bool:
  """Whether the file starts like a zip archive (an `.npz`), even a truncated one.

  `zipfile.is_zipfile` looks for the directory at the end of the file, so it
  says False for a truncated archive; the local header's magic bytes at the
  start survive truncation.
  """
  with open(path, "rb") as f:
    return f.read(4) in (_ZIP_MAGIC, _EMPTY_ZIP_MAGIC)


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` (as written by `np.savez`), by name.

  Args:
    path: the file.

  Returns:
    {name: array}, names without the `.npy` suffix, arrays in memory.

  Raises:
    DataFormatError: (a ValueError) the file is not a zip archive, is
      truncated, a member fails its CRC-32 check or is not an `.npy` array, a
      header disagrees with the member's size, or an array holds Python
      objects; the message names the file.

  Example:
    >>> arrays = read_npz("purchase100.npz")  # doctest: +SKIP
    >>> sorted(arrays)  # doctest: +SKIP
    ['arr_0', 'arr_1', 'arr_2', 'arr_3']
  """
  path = os.fspath(path)
  try:
    with zipfile.ZipFile(path) as archive:
      arrays = {}
      for member in archive.infolist():
        name = member.filename
        if not name.endswith(".npy"):
          raise DataFormatError(path, f"member {name!r} is not an .npy array")
        arrays[name.removesuffix(".npy")] = _read_member(path, archive, member)
  except DataFormatError:
    raise
  except _DAMAGE as e:
    raise DataFormatError(path, f"not a readable .npz file ({type(e).__name__}: {e})") from e
  return arrays


def _read_member(path: str, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> np.ndarray:
  with archive.open(member) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
      shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise DataFormatError(path, f"{member.filename}: unknown .npy version {version}")
    if dtype.hasobject:
      raise DataFormatError(path, f"{member.filename}: holds Python objects; refused")
    expected = math.prod(shape) * dtype.itemsize
    available = member.file_size - f.tell()
    if expected != available:
      raise DataFormatError(
        path,
        f"{member.filename}: the header gives shape {shape} of {dtype} ({expected} bytes) "
        f"but the member holds {available} bytes: truncated or corrupt",
      )
    contents = f.read()  # zipfile checks the CRC-32 once the member is read to its end
  if len(contents) != expected:
    raise DataFormatError(path, f"{member.filename}: truncated ({len(contents)} of {expected})")
  array = np.frombuffer(contents, dtype)
  return array.reshape(shape, order="F" if fortran_order else "C").copy()
